"""The one queue state machine: what to do next about a queued request, after each answer.

A :class:`RequestWatch` does no I/O and never sleeps. The worker-side wait
(:meth:`FalClient.wait <airflow_provider_fal.core.client.FalClient.wait>`), the trigger and the
batch's queue mode each send the calls it asks for, in their own way (blocking, async, or
scheduled among many requests), feed it the answers, and so all three decide alike:

* a status poll: ``COMPLETED`` -> :class:`FetchResult`, also with an ``error`` (the result read
  then raises the model's error as a synchronous call would get it); still pending ->
  :class:`PollAfter`, or :class:`CancelNow` once the deadline has passed;
* a cancel answer (the timeout outcome): ``ALREADY_COMPLETED`` -> poll once more at once and
  fetch the finished (paid) result. ``CANCELLATION_REQUESTED`` is a request, not a fact: fal
  drops a queued request, but a running one only gets a signal and may still finish (and be
  billed). So poll on, for up to :data:`CANCEL_CONFIRM_WINDOW` seconds, until fal says what
  happened: cancelled -> :class:`Fail` with a timeout error; completed anyway ->
  :class:`FetchResult` with ``late=True`` (deliver the paid result rather than drop it); still
  running -> :class:`Fail` with a timeout error that says it may still complete and be billed.
  A failed cancel -> :class:`Fail` naming why;
* a failed poll: retryable errors (a malformed answer to a poll among them) back off and poll
  again for up to :data:`POLL_FAILURE_GRACE` seconds (a short fal or network outage costs
  nothing), then -> :class:`Fail` with the request left running, since a retry of the task
  reattaches to it; others -> :class:`CancelNow` first (nobody will come back for the request,
  so it should not run on and be billed), then :class:`Fail` with the error, saying what the
  cancel answered (or :class:`FetchResult` if fal says it already completed).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from airflow_provider_fal.core.queue import ALREADY_COMPLETED, GONE_STATUSES, QueueHandle, QueueStatus, gone_error
from airflow_provider_fal.exceptions import FalError, FalTimeoutError

#: How long polls may keep failing with retryable errors (each after the retry policy gave up
#: on it) before the wait reports the failure.
POLL_FAILURE_GRACE = 600.0
#: The longest pause between polls while polls are failing.
MAX_POLL_BACKOFF = 60.0
#: How long to keep polling after a cancel was accepted, to learn whether the request stopped.
CANCEL_CONFIRM_WINDOW = 30.0
#: The pause between those polls (at most; a shorter poll interval is kept).
CANCEL_CONFIRM_POLL = 1.0
#: What a driver logs (with the request id) when it delivers a :class:`FetchResult` with ``late``.
LATE_RESULT = (
    "fal request %s completed after its deadline although a cancel was requested; its result is "
    "billed, so it is delivered rather than dropped."
)


@dataclass(frozen=True)
class PollAfter:
    """Poll the status again after ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class FetchResult:
    """The request completed: fetch its result now (fal keeps results >= 10 KB only 6 minutes).

    ``late``: it completed after the deadline, although a cancel had been requested; its result
    is paid for, so it is delivered (say so in the log).
    ``failure``: the status said the request failed. The result is still read, as fal's own
    client does: it carries the model's real status and body (a 422's field list), which the
    result read raises as the same error a synchronous call would get; should the result read
    as a success all the same, raise ``failure``.
    """

    late: bool = False
    failure: FalError | None = None


@dataclass(frozen=True)
class CancelNow:
    """The deadline passed: cancel the request, then hand the answer to :meth:`RequestWatch.after_cancel`."""


@dataclass(frozen=True)
class Fail:
    """The wait is over without a result: raise (or report) ``error``."""

    error: FalError


Step = PollAfter | FetchResult | CancelNow | Fail


class RequestWatch:
    """The state of waiting on one queued request; see the module docstring.

    :param poll_interval: seconds between status polls.
    :param deadline: when to give up, in ``clock`` time; None waits as long as fal keeps the request.
    :param deadline_reason: what set the deadline, for the timeout message (``"poll_timeout of 30 s"``).
    :param clock: the clock ``deadline`` is on: ``time.monotonic`` within a process, ``time.time``
        for a deadline that must survive a restart (the trigger's).
    :param cancel_on_timeout: cancel the request when the deadline passes, or leave it running.
    :param poll_delay: the pause before the next poll given the seconds since the watch began
        (e.g. longer pauses for long jobs); by default always ``poll_interval``.
    :param jitter: spread each pause by up to this fraction either way, so that many watches
        resumed together (after a triggerer restart) drift apart.
    """

    def __init__(
        self,
        handle: QueueHandle,
        *,
        poll_interval: float,
        deadline: float | None = None,
        deadline_reason: str = "its deadline",
        clock: Callable[[], float] = time.monotonic,
        cancel_on_timeout: bool = True,
        poll_delay: Callable[[float], float] | None = None,
        jitter: float = 0.0,
    ) -> None:
        self.handle = handle
        self.poll_interval = poll_interval
        self.deadline = deadline
        self.deadline_reason = deadline_reason
        self.clock = clock
        self.cancel_on_timeout = cancel_on_timeout
        self.poll_delay = poll_delay
        self.jitter = jitter
        self.started = clock()
        self.cancel_answer: str | None = None
        self._cancel_requested_at: float | None = None
        self._failing_since: float | None = None
        self._failed_polls = 0
        self._given_up: FalError | None = None

    def __repr__(self) -> str:
        return f"RequestWatch(request_id={self.handle.request_id!r})"

    # ------------------------------------------------------------------ answers in, steps out

    def after_status(self, status: QueueStatus) -> Step:
        """The next step after a status answer."""
        self._failing_since, self._failed_polls = None, 0
        failure = status.failure(self.handle)
        if self._cancel_requested_at is not None:
            return self._after_cancel_request(status, failure)
        if status.completed:
            return FetchResult(failure=failure)
        if self.cancel_answer == ALREADY_COMPLETED:  # fal said it completed, but the status disagrees
            return Fail(self.timeout_error("not cancelled (fal says it already completed)"))
        if self.expired():
            return CancelNow() if self.cancel_on_timeout else Fail(self.timeout_error("left running"))
        return PollAfter(self._pause(self._regular_delay()))

    def after_cancel(self, answer: str | FalError) -> Step:
        """The next step after the cancel a :class:`CancelNow` asked for (its answer, or its error)."""
        if self._given_up is not None:
            return self._after_give_up_cancel(self._given_up, answer)
        if answer == ALREADY_COMPLETED:
            # It finished just now: its result is paid for, so read the status once more and fetch it.
            self.cancel_answer = ALREADY_COMPLETED
            return PollAfter(0.0)
        if isinstance(answer, FalError):
            return Fail(self.timeout_error(f"not cancelled ({answer})"))
        self.cancel_answer = answer
        self._cancel_requested_at = self.clock()
        return PollAfter(min(self.poll_interval, CANCEL_CONFIRM_POLL))

    def _after_cancel_request(self, status: QueueStatus, failure: FalError | None) -> Step:
        """After fal accepted a cancel: learn whether the request stopped or finished anyway."""
        if failure is not None:
            return Fail(self.timeout_error("cancelled"))
        if status.completed:
            return FetchResult(late=True)
        assert self._cancel_requested_at is not None
        if self.clock() - self._cancel_requested_at >= CANCEL_CONFIRM_WINDOW:
            return Fail(
                self.timeout_error(
                    f"asked to cancel, but was still {status.status} {CANCEL_CONFIRM_WINDOW:g} s later; a running "
                    "request may still complete, and fal bills it if it does"
                )
            )
        return PollAfter(min(self.poll_interval, CANCEL_CONFIRM_POLL))

    def after_poll_error(self, error: FalError) -> Step:
        """The next step after a status poll failed (after the retry policy's own attempts)."""
        if error.status_code in GONE_STATUSES:
            return Fail(gone_error(self.handle, error))
        if not error.retryable:
            return self._give_up(error)
        now = self.clock()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since > POLL_FAILURE_GRACE:
            return Fail(error)
        if self.expired():
            return CancelNow() if self.cancel_on_timeout else Fail(self.timeout_error("left running"))
        self._failed_polls += 1
        return PollAfter(self._pause(min(MAX_POLL_BACKOFF, self.poll_interval * 2**self._failed_polls)))

    def _give_up(self, error: FalError) -> Step:
        """The wait ends on ``error``: cancel the request first, so that it is not left running
        (and billed) with nobody waiting for its result."""
        if not self.cancel_on_timeout or self.cancel_answer is not None or self._cancel_requested_at is not None:
            return Fail(error)
        self._given_up = error
        return CancelNow()

    def _after_give_up_cancel(self, error: FalError, answer: str | FalError) -> Step:
        if answer == ALREADY_COMPLETED:
            # It finished meanwhile: its result is paid for, so try to read it rather than drop it.
            self._given_up = None
            self.cancel_answer = ALREADY_COMPLETED
            return FetchResult(late=True)
        outcome = f"the cancel failed ({answer})" if isinstance(answer, FalError) else f"fal answered {answer}"
        error.message = (
            f"{error.message} The wait for fal request {self.handle.request_id} gave up, so it was asked to "
            f"cancel ({outcome}); a request already running may still complete and be billed."
        )
        return Fail(error)

    # ------------------------------------------------------------------ helpers

    def expired(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def timeout_error(self, outcome: str) -> FalTimeoutError:
        """The error of a wait that ran out; ``outcome`` is what became of the request."""
        handle = self.handle
        return FalTimeoutError(
            f"fal request {handle.request_id} for {handle.model_id} did not complete within "
            f"{self.deadline_reason}; the request was {outcome}.",
            request_id=handle.request_id,
        )

    def _regular_delay(self) -> float:
        if self.poll_delay is None:
            return self.poll_interval
        return self.poll_delay(self.clock() - self.started)

    def _pause(self, seconds: float) -> float:
        if self.jitter:
            seconds *= random.uniform(1 - self.jitter, 1 + self.jitter)
        if self.deadline is not None:
            seconds = min(seconds, max(0.0, self.deadline - self.clock()))
        return max(0.0, seconds)
