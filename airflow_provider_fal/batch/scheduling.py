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
#: The limit a batch starts at: sent before fal has answered anything, so at a limit of 4 on fal
#: (where a 429 takes a network round trip to come back) 12 are refused at once.
INITIAL_LIMIT = 16
#: Slots added per success until the first 429 (paced: see :class:`AdaptiveLimit`).
SLOW_START_GROWTH = 2
#: Rounds of successes before one more slot is tried, at first and at most.
PROBE_ROUNDS = 2
MAX_PROBE_ROUNDS = 32
#: The longest pause a Retry-After may impose on new starts, in seconds.
MAX_PAUSE = 60.0


class AdaptiveLimit:
    """A limit on requests in flight that finds the fal account's concurrency limit and stays there.

    fal answers 429 to a synchronous request when the account already runs as many requests as
    it may. So a 429 is a census: the batch's requests that fal was running when it refused one
    are the account's limit (less whatever other clients of the account run). The limit becomes
    that count at once, instead of halving and creeping back as AIMD does and settling well
    below the real limit.

    * **Slow start**: the limit begins at ``min(maximum, initial)`` and grows by
      :data:`SLOW_START_GROWTH` per success until the first 429 (it triples per round of
      requests at most). Starts past the most requests ever in flight are paced, one per
      ``latency / (growth x in flight)`` (``latency``: the shortest success so far), so the batch
      grows smoothly rather than in bursts, and few requests go past the account's limit before
      its first 429 comes back.
    * **Census**: a 429 lowers the limit at once to the requests in flight when the refused one
      started, or to those older than it still in flight if more (at least ``minimum``; a
      refused probe: to the level that held). It is taken when the refused request started, not
      when its 429 came back: in a burst past the limit more requests start while the 429s
      travel back. It may fall short (a thread may send its request after younger ones), so
      once every request running at the 429 is over, the limit rises to how many of them fal
      ran, if more. A 429 never raises it; ``Retry-After`` pauses new starts.
    * **Probing**: after ``probe_rounds`` rounds of successes (a round: ``limit`` successes) one
      more slot is tried. A probe that draws a 429 doubles the rounds before the next (up to
      :data:`MAX_PROBE_ROUNDS`), so a stable limit costs few 429s; a probe that held for a round
      resets them, so a raised account limit is found again.

    :meth:`acquire` blocks until a request may start and returns its token (:meth:`try_acquire`
    does not block); :meth:`release` reports how it went, and whether a refused request may be
    sent again as soon as it gets a slot, without a backoff wait.
    """

    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        initial: int = INITIAL_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self._clock = clock
        self._limit = max(self.minimum, min(maximum, initial))
        self._slow_start = True
        self._probe_rounds = PROBE_ROUNDS
        self._successes = 0
        self._probed = False
        self._in_flight: dict[int, tuple[int, float]] = {}  # token -> (others in flight, start time)
        self._next_token = 0
        self._latency: float | None = None  # the shortest success so far
        self._next_growth = 0.0  # slow start: when a start past the peak may go
        self._census: set[int] | None = None  # the requests running at the last 429, until all are over
        self._census_ran = 0  # how many of them fal ran (not refused)
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
                token, wait = self._start()
                if token is not None:
                    return token
                self._cond.wait(wait)
            return None

    def try_acquire(self) -> int | None:
        """A slot if one is free now, else ``None``."""
        with self._cond:
            return None if self._closed else self._start()[0]

    def _start(self) -> tuple[int | None, float | None]:
        """A new token, or ``None`` and how long to wait (``None``: until a release)."""
        now = self._clock()
        running = len(self._in_flight)
        if self._resume_at > now:
            return None, self._resume_at - now
        if running >= self._limit:
            return None, None
        growing = self._slow_start and self._latency is not None and running >= self.peak_in_flight
        if growing:
            if self._next_growth > now:
                return None, self._next_growth - now
            self._next_growth = now + self._latency / (SLOW_START_GROWTH * (running + 1))
        token = self._next_token
        self._next_token += 1
        self._in_flight[token] = (running, now)
        self.peak_in_flight = max(self.peak_in_flight, running + 1)
        return token, None

    def release(self, token: int, *, rate_limited: bool = False, error: BaseException | None = None) -> bool:
        """The request of ``token`` is over: refused with a 429 (``rate_limited``) or not.

        Returns whether a refused request may be sent again as soon as it gets a slot, without
        a backoff wait: other requests of the batch are running (one of them will free a slot
        on fal) and fal sent no ``Retry-After``.
        """
        with self._cond:
            running_then, started = self._in_flight.pop(token, (0, self._clock()))
            older = sum(1 for other in self._in_flight if other < token)
            counted = self._census is not None and token in self._census
            if counted:
                self._census.discard(token)  # type: ignore[union-attr]
                self._census_ran += 0 if rate_limited else 1
            retry_now = False
            if rate_limited:
                retry_after = getattr(error, "retry_after", None)
                self._after_429(max(running_then, older), retry_after)
                retry_now = not retry_after and bool(self._in_flight)
            else:
                if error is None:  # a generation's time (an error may come back at once)
                    took = self._clock() - started
                    self._latency = took if self._latency is None else min(self._latency, took)
                self._after_success()
            if counted and not self._census:  # every request running at the last 429 is over
                self._census = None
                self._limit = max(self._limit, min(self.maximum, self._census_ran))
            # Wake as many waiters as may start (all of them on every release kept two cores busy).
            self._cond.notify(max(1, self._limit - len(self._in_flight)))
            return retry_now

    def _after_429(self, census: int, retry_after: float | None) -> None:
        if self._probed:  # the probe went past the account's limit: back to the level that held, probe less often
            census = max(census, self._limit - 1)
            self._probe_rounds = min(MAX_PROBE_ROUNDS, self._probe_rounds * 2)
        self._probed = False
        self._slow_start = False
        self._successes = 0
        census = max(self.minimum, census)
        if census < self._limit:
            self._limit = census
            self.decreases += 1
            self.lowest_limit = min(self.lowest_limit, census)
        if self._in_flight:  # settled once they are over, by how many of them fal ran
            self._census, self._census_ran = set(self._in_flight), 0
        if retry_after:
            self._resume_at = max(self._resume_at, self._clock() + min(float(retry_after), MAX_PAUSE))

    def _after_success(self) -> None:
        if self._limit >= self.maximum:
            return
        if self._slow_start:
            self._limit = min(self.maximum, self._limit + SLOW_START_GROWTH)
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
