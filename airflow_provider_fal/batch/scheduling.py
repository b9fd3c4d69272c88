"""Concurrency and scheduling primitives of the batch engine (:mod:`airflow_provider_fal.batch`).

* :class:`AdaptiveLimit`: a limit on requests in flight that finds the account's limit from 429s.
* :class:`QueueWork`: queue mode's shared work list: inputs still to submit, in order, and
  submitted requests waiting for their next status poll.

Nothing here sends a request.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from airflow_provider_fal.core.queue import QueueHandle
from airflow_provider_fal.core.watch import RequestWatch

#: Queue mode: the longest wait between two status polls of one request, in seconds.
MAX_POLL_DELAY = 30.0
#: The limit a batch starts at (then one more per success until the first 429).
INITIAL_LIMIT = 8
#: Rounds of successes before one more slot is tried, at first and at most.
PROBE_ROUNDS = 2
MAX_PROBE_ROUNDS = 32
#: The longest pause a Retry-After may impose on new starts, in seconds.
MAX_PAUSE = 60.0


class AdaptiveLimit:
    """A limit on requests in flight that finds the fal account's concurrency limit and stays there.

    fal answers 429 to a synchronous request when the account already runs as many requests as
    it may. So a 429 is a census: the batch's other requests still in flight are (at most) the
    ones fal is running, and their count is the account's limit (less whatever other clients of
    the account run). The limit becomes that count at once, instead of halving and creeping back
    as AIMD does and settling well below the real limit. After a burst past the limit, each of
    the refused requests lowers it once more as it comes back, down to the requests fal accepted.
    (Counting only the requests that started before the refused one undercounts: threads send in
    a different order than they took their slots, and the limit collapsed to 1 under a limit of 4.)

    * **Slow start**: the limit begins at ``min(maximum, initial)`` and grows by one per success
      (doubling per round of requests) until the first 429.
    * **Census**: a 429 sets the limit to the number of other requests in flight (at least
      ``minimum``); a 429 never raises it. ``Retry-After`` pauses new starts.
    * **Probing**: after ``probe_rounds`` rounds of successes (a round: ``limit`` successes) one
      more slot is tried. A probe that draws a 429 doubles the rounds before the next (up to
      :data:`MAX_PROBE_ROUNDS`), so a stable limit costs few 429s; a probe that held for a round
      resets them, so a raised account limit is found again.

    :meth:`acquire` blocks until a request may start and returns its token; :meth:`release`
    reports how it went.
    """

    def __init__(self, maximum: int, *, minimum: int = 1, initial: int = INITIAL_LIMIT) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self._limit = max(self.minimum, min(maximum, initial))
        self._slow_start = True
        self._probe_rounds = PROBE_ROUNDS
        self._successes = 0
        self._probed = False
        self._in_flight: set[int] = set()
        self._next_token = 0
        self._resume_at = 0.0
        self._closed = False
        self._cond = threading.Condition()
        self.peak_in_flight = 0
        self.decreases = 0
        self.lowest_limit = self._limit

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def acquire(self) -> int | None:
        """Wait for a free slot; ``None`` once :meth:`close` was called."""
        with self._cond:
            while not self._closed:
                wait = self._resume_at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                elif len(self._in_flight) >= self._limit:
                    self._cond.wait()
                else:
                    token = self._next_token
                    self._next_token += 1
                    self._in_flight.add(token)
                    self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))
                    return token
            return None

    def release(self, token: int, *, rate_limited: bool = False, error: BaseException | None = None) -> None:
        with self._cond:
            self._in_flight.discard(token)
            if rate_limited:
                self._after_429(token, getattr(error, "retry_after", None))
            else:
                self._after_success()
            self._cond.notify_all()

    def _after_429(self, token: int, retry_after: float | None) -> None:
        running = len(self._in_flight)
        census = max(self.minimum, running)
        self._slow_start = False
        self._successes = 0
        if census < self._limit:
            self._limit = census
            self.decreases += 1
            self.lowest_limit = min(self.lowest_limit, census)
            if self._probed:  # the last probe went past the account's limit: probe less often
                self._probe_rounds = min(MAX_PROBE_ROUNDS, self._probe_rounds * 2)
        self._probed = False
        if retry_after:
            self._resume_at = max(self._resume_at, time.monotonic() + min(float(retry_after), MAX_PAUSE))

    def _after_success(self) -> None:
        if self._limit >= self.maximum:
            return
        if self._slow_start:
            self._limit += 1
            return
        self._successes += 1
        if self._probed and self._successes >= self._limit:
            self._probed = False  # the last probe held for a round: the account allows more
            self._probe_rounds = PROBE_ROUNDS
        if self._successes >= self._probe_rounds * self._limit:
            self._limit += 1
            self._successes = 0
            self._probed = True

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

    def __init__(self, to_submit: Iterable[int]) -> None:
        self.cond = threading.Condition()
        self.to_submit: deque[int] = deque(to_submit)
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
