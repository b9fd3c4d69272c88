"""Concurrency and scheduling primitives of the batch engine (:mod:`airflow_provider_fal.batch`).

* :class:`AdaptiveLimit`: an AIMD limit on requests in flight, lowered by 429s.
* :class:`QueueWork`: queue mode's shared work list: inputs still to submit, in order, and
  submitted requests waiting for their next status poll.

Nothing here sends a request.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from airflow_provider_fal.core.queue import QueueHandle
from airflow_provider_fal.core.watch import RequestWatch

#: Queue mode: the longest wait between two status polls of one request, in seconds.
MAX_POLL_DELAY = 30.0


class AdaptiveLimit:
    """An AIMD limit on requests in flight, shared by the batch's worker threads.

    :meth:`acquire` blocks until a request may start and returns a token (the current epoch);
    :meth:`release` reports how it went. The first 429 of an epoch halves the limit and pauses
    new starts for ``pause(level, error)`` seconds, e.g. the retry policy's ``backoff`` (``level``
    counts the decreases since the last answer that was not a 429). 429s of requests started
    before that decrease are ignored (they saw the old limit). Every other answer adds
    ``1/limit``, so the limit grows by about one per round of requests until it is back at
    ``maximum``.
    """

    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        pause: Callable[[int, BaseException | None], float] | None = None,
    ) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self._pause = pause or (lambda level, error: 0.0)
        self._limit = float(maximum)
        self._in_flight = 0
        self._epoch = 0
        self._level = 0
        self._resume_at = 0.0
        self._closed = False
        self._cond = threading.Condition()
        self.peak_in_flight = 0
        self.decreases = 0
        self.lowest_limit = maximum

    @property
    def limit(self) -> int:
        return max(self.minimum, int(self._limit))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def acquire(self) -> int | None:
        """Wait for a free slot; ``None`` once :meth:`close` was called."""
        with self._cond:
            while not self._closed:
                wait = self._resume_at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                elif self._in_flight >= self.limit:
                    self._cond.wait()
                else:
                    self._in_flight += 1
                    self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
                    return self._epoch
            return None

    def release(self, token: int, *, rate_limited: bool = False, error: BaseException | None = None) -> None:
        with self._cond:
            self._in_flight -= 1
            if rate_limited:
                if token == self._epoch:
                    self._epoch += 1
                    self._level += 1
                    self.decreases += 1
                    self._limit = max(float(self.minimum), self._limit / 2)
                    self.lowest_limit = min(self.lowest_limit, self.limit)
                    self._resume_at = max(self._resume_at, time.monotonic() + self._pause(self._level, error))
            else:
                self._level = 0
                if self._limit < self.maximum:
                    self._limit = min(float(self.maximum), self._limit + 1 / self._limit)
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter; no request starts after this."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(order=True)
class ScheduledPoll:
    """A submitted request waiting for its next status poll (heap-ordered by ``due``).

    ``watch`` decides what to do after each answer about it (see :mod:`core.watch`).
    """

    due: float
    index: int
    watch: RequestWatch = field(compare=False)

    @property
    def handle(self) -> QueueHandle:
        return self.watch.handle


class QueueWork:
    """Inputs still to submit (in order) and submitted requests to poll, shared by the workers.

    A poll that is due goes first, so results are fetched promptly (fal keeps results of 10 KB
    or more only 6 minutes); otherwise the next input is submitted; otherwise workers wait for
    the next poll to fall due.
    """

    def __init__(self, total: int) -> None:
        self.cond = threading.Condition()
        self.to_submit: deque[int] = deque(range(total))
        self.polls: list[ScheduledPoll] = []
        self.outstanding: dict[int, QueueHandle] = {}  # submitted, not finished
        self.active = 0  # workers holding an item that may add a poll
        self.stop_submitting = False
        self.abort = False

    def take(self) -> ScheduledPoll | int | None:
        """The next poll or input index to submit; ``None`` when nothing is left (or on abort)."""
        with self.cond:
            while not self.abort:
                now = time.monotonic()
                if self.polls and self.polls[0].due <= now:
                    self.active += 1
                    return heapq.heappop(self.polls)
                if self.to_submit and not self.stop_submitting:
                    self.active += 1
                    return self.to_submit.popleft()
                if not self.polls and self.active == 0:
                    return None
                self.cond.wait(self.polls[0].due - now if self.polls else None)
            return None

    def submitted(self, poll: ScheduledPoll) -> None:
        with self.cond:
            self.outstanding[poll.index] = poll.handle
            heapq.heappush(self.polls, poll)
            self.cond.notify_all()

    def finished(self, index: int) -> None:
        with self.cond:
            self.outstanding.pop(index, None)
            self.cond.notify_all()

    def release(self) -> None:
        """The worker is done with the item it took."""
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def stop(self, *, abort: bool, on_abort: Callable[[dict[int, QueueHandle]], None]) -> dict[int, QueueHandle]:
        """Submit nothing more; with ``abort`` also poll nothing more and return what is still running.

        ``on_abort`` sees those requests before any worker can notice the abort and finish.
        """
        with self.cond:
            self.stop_submitting = True
            self.cond.notify_all()
            if not abort:
                return {}
            self.abort = True
            running, self.outstanding = self.outstanding, {}
            on_abort(running)
            return running


def next_poll_delay(poll_interval: float, age: float) -> float:
    """Seconds until the next status poll of a request submitted ``age`` seconds ago.

    Every ``poll_interval`` at first, then a tenth of the request's age (a five-minute video
    is polled every 30 s, not every 2 s), never more than 30 s apart.
    """
    return max(poll_interval, min(age / 10, MAX_POLL_DELAY))
