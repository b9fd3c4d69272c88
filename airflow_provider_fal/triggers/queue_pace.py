"""How long a deferred batch's requests are expected to wait in fal's queue (see FalBatchTrigger)."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

#: The longest pause between two polls of a request that waits in fal's queue, in seconds.
MAX_QUEUED_POLL_DELAY = 120.0
#: Completions seen before the trigger trusts its own measure of the queue's rate.
MIN_COMPLETIONS_FOR_RATE = 10
#: Seconds between two positions of one request for their difference to measure the queue's pace.
MIN_DRAIN_SPAN = 1.0
#: Weight of a new measure of the queue's pace in its running average.
DRAIN_WEIGHT = 0.2


class QueuePace:
    """How long a batch's request is expected to wait in fal's queue.

    fal's queue serves requests in order, at the pace the account's concurrency allows; a request
    at ``queue_position`` p starts in about p / rate seconds. The rate is measured from how fast
    the positions of the batch's requests go down between two polls of the same request (a
    running average); until a request was seen twice, from the batch's completions this round
    (once :data:`MIN_COMPLETIONS_FOR_RATE` came), else the previous round's rate (``rate_hint``).
    Completions alone lag: a completion is counted when a poll sees it, so early in a round
    they make the queue look slow, and its requests would be polled after they ended.
    """

    def __init__(self, rate_hint: float | None, clock: Callable[[], float] = time.time) -> None:
        self.rate_hint = rate_hint
        self.clock = clock
        self.started = clock()
        self.completions = 0
        self._positions: dict[str, tuple[int, float]] = {}  # request -> (position, when) at its last poll
        self._drain: float | None = None

    def observe(self, index: str, position: int) -> None:
        """A poll saw request ``index`` at ``position`` in the queue."""
        now = self.clock()
        before = self._positions.get(index)
        if before is not None and now - before[1] < MIN_DRAIN_SPAN:
            return  # too close to the last one to measure; keep the older position
        self._positions[index] = (position, now)
        if before is not None and position < before[0]:
            sample = (before[0] - position) / (now - before[1])
            self._drain = sample if self._drain is None else (1 - DRAIN_WEIGHT) * self._drain + DRAIN_WEIGHT * sample

    @property
    def rate(self) -> float | None:
        """Requests the queue serves per second: measured from positions, else from completions, else the hint."""
        if self._drain:
            return self._drain
        elapsed = self.clock() - self.started
        if self.completions >= MIN_COMPLETIONS_FOR_RATE and elapsed >= 1.0:
            return self.completions / elapsed
        return self.rate_hint

    def queued_delay(self, position: int) -> float | None:
        """Seconds until a request at ``position`` should be polled again (``None``: no estimate)."""
        rate = self.rate
        if not rate:
            return None
        return min(MAX_QUEUED_POLL_DELAY, 0.9 * position / rate)

    def first_polls(self, indexes: list[str]) -> list[tuple[float, str]]:
        """When to poll each request first (a heap): at once, or spread in submit order when the rate is known."""
        now = self.clock()
        rate = self.rate_hint
        due = [
            (now + (min(MAX_QUEUED_POLL_DELAY, 0.9 * k / rate) if rate else 0.0), index)
            for k, index in enumerate(indexes)
        ]
        heapq.heapify(due)
        return due
