"""The batch's adaptive in-flight limit (:class:`~airflow_provider_fal.batch.scheduling.AdaptiveLimit`).

Deterministic: requests are tokens acquired and released by the test in a chosen order, and
time is a fake clock the test moves. Real HTTP under an account limit is in ``test_batch.py``.
"""

from __future__ import annotations

import threading

from airflow_provider_fal.batch.scheduling import INITIAL_LIMIT, SLOW_START_GROWTH, AdaptiveLimit
from airflow_provider_fal.exceptions import FalRateLimitError


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def take(limit: AdaptiveLimit, count: int) -> list[int]:
    """``count`` tokens, each of which must be free now."""
    tokens = [limit.try_acquire() for _ in range(count)]
    assert None not in tokens, tokens
    return tokens  # type: ignore[return-value]


def test_slow_start_begins_at_the_initial_limit_and_grows_per_success():
    assert AdaptiveLimit(64).limit == INITIAL_LIMIT == 16
    assert AdaptiveLimit(6).limit == 6  # never above max_concurrency
    clock = Clock()
    limit = AdaptiveLimit(64, clock=clock)
    first = take(limit, 16)
    assert limit.try_acquire() is None  # full
    clock.now += 1.0
    for token in first[:4]:
        limit.release(token)
    assert limit.limit == 16 + 4 * SLOW_START_GROWTH


def test_starts_past_the_peak_are_paced_by_the_latency_in_slow_start():
    clock = Clock()
    limit = AdaptiveLimit(64, initial=4, clock=clock)
    first = take(limit, 4)
    clock.now += 1.0  # requests take a second
    for token in first:
        limit.release(token)
    assert limit.limit == 4 + 4 * SLOW_START_GROWTH == 12
    take(limit, 4)  # as many as ran before start at once
    assert limit.try_acquire() is not None  # the first start past the peak (4) goes now
    assert limit.try_acquire() is None  # the next waits latency / (growth x in flight)
    clock.now += 1.0 / (SLOW_START_GROWTH * 5) - 1e-6
    assert limit.try_acquire() is None
    clock.now += 2e-6
    assert limit.try_acquire() is not None
    assert limit.in_flight == 6 < limit.limit


def test_a_429_counts_the_requests_in_flight_when_the_refused_one_started_not_when_it_came_back():
    limit = AdaptiveLimit(64, clock=Clock())
    tokens = take(limit, 16)
    # fal runs the first 10 and refuses the other 6; the 429s come back while all 16 are in flight
    assert limit.release(tokens[10], rate_limited=True) is True  # retried as soon as a slot is free
    assert limit.limit == 10  # not 15, the requests still in flight when its 429 came back
    for token in tokens[11:]:
        limit.release(token, rate_limited=True)
    assert limit.limit == 10 and limit.decreases == 1 and limit.lowest_limit == 10
    for token in tokens[:10]:
        limit.release(token)
    assert limit.limit == 10  # no slow start any more
    assert len(take(limit, 10)) == 10 and limit.try_acquire() is None


def test_an_undercount_is_settled_by_how_many_of_the_running_requests_fal_ran():
    limit = AdaptiveLimit(64, clock=Clock())
    tokens = take(limit, 12)
    # Token 3's thread sent it last: fal ran the 11 others and refused it. Only 3 were in
    # flight when it started, so the limit drops to 3 at first...
    limit.release(tokens[3], rate_limited=True)
    assert limit.limit == 3
    for token in tokens[:3] + tokens[4:11]:
        limit.release(token)
    assert limit.limit < 11  # ...until every request running at the 429 is over (probes are slow)
    limit.release(tokens[11])
    assert limit.limit == 11


def test_a_refused_request_is_retried_at_once_only_while_others_of_the_batch_run_and_fal_sent_no_retry_after():
    limit = AdaptiveLimit(8, clock=Clock())
    alone = take(limit, 1)[0]
    assert limit.release(alone, rate_limited=True) is False  # nothing of ours will free a slot: back off
    limit = AdaptiveLimit(8, clock=Clock())
    first, second = take(limit, 2)
    pause = FalRateLimitError("slow down", retry_after=1.0)
    assert limit.release(second, rate_limited=True, error=pause) is False
    assert limit.release(first) is False  # a success is not retried


def test_probes_are_rare_where_the_limit_holds_and_find_a_raised_one():
    limit = AdaptiveLimit(32, initial=5, clock=Clock())
    held = take(limit, 4)
    limit.release(take(limit, 1)[0], rate_limited=True)  # an account limit of 4: the fifth is refused
    assert limit.limit == 4
    probes = []
    for finished in range(400):
        limit.release(held.pop(0))
        held.append(take(limit, 1)[0])
        if limit.in_flight < limit.limit:  # a probe: one more slot, and fal refuses the extra request
            probes.append(finished)
            limit.release(take(limit, 1)[0], rate_limited=True)
            assert limit.limit == 4  # back to the level that held
    assert limit.limit == 4 and 2 <= len(probes) <= 7, probes  # waits double after each failed probe
    for token in held:
        limit.release(token)
    grown = 0
    while limit.limit < 8 and grown < 2000:  # the account's limit was raised: every probe holds
        limit.release(take(limit, 1)[0])
        grown += 1
    assert limit.limit == 8 and grown < 200


def test_a_probe_refused_after_a_request_that_started_with_it_goes_back_to_the_level_that_held():
    limit = AdaptiveLimit(32, initial=5, clock=Clock())
    held = take(limit, 4)
    limit.release(take(limit, 1)[0], rate_limited=True)
    while limit.in_flight == limit.limit:  # run at 4 until the next probe opens a fifth slot
        limit.release(held.pop(0))
        held.extend(take(limit, 1))
    replacement, probe = held[-1], take(limit, 1)[0]
    held.pop()
    # The replacement's thread sent it after the probe's: fal ran the probe and refused the
    # replacement, which had started with only 3 others in flight.
    limit.release(replacement, rate_limited=True)
    assert limit.limit == 4 and limit.in_flight == 4  # the three held and the probe
    limit.release(probe)


def test_retry_after_on_a_429_pauses_new_starts():
    clock = Clock()
    limit = AdaptiveLimit(4, clock=clock)
    first, second, third = take(limit, 3)
    limit.release(third, rate_limited=True, error=FalRateLimitError("slow down", retry_after=1.0))
    limit.release(second)
    assert limit.in_flight < limit.limit  # a slot is free, yet nothing may start for a second
    assert limit.try_acquire() is None
    clock.now += 0.999
    assert limit.try_acquire() is None
    clock.now += 0.002
    assert limit.try_acquire() is not None
    limit.release(first)


def test_adaptive_limit_blocks_when_full_and_close_releases_waiters():
    limit = AdaptiveLimit(1)
    limit.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(limit.acquire()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # still waiting for the one slot
    limit.close()
    waiter.join(5)
    assert got == [None]
    assert limit.try_acquire() is None
