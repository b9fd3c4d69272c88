"""The queue state machine on its own: every answer in, the next step out (no HTTP, no sleeping)."""

from __future__ import annotations

import pytest

from airflow_provider_fal.core.queue import (
    ALREADY_COMPLETED,
    CANCELLATION_REQUESTED,
    COMPLETED,
    IN_PROGRESS,
    IN_QUEUE,
    QueueHandle,
    QueueStatus,
)
from airflow_provider_fal.core.watch import (
    CANCEL_CONFIRM_WINDOW,
    MAX_POLL_BACKOFF,
    POLL_FAILURE_GRACE,
    CancelNow,
    Fail,
    FetchResult,
    PollAfter,
    RequestWatch,
)
from airflow_provider_fal.exceptions import (
    FalAuthError,
    FalClientError,
    FalServerError,
    FalTimeoutError,
    FalTransientError,
)

HANDLE = QueueHandle.rebuild("https://queue.fal.run", "fal-ai/flux/dev", "req-1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status(state: str, **fields) -> QueueStatus:
    return QueueStatus(status=state, request_id="req-1", **fields)


def watch(clock: Clock, **options) -> RequestWatch:
    options.setdefault("poll_interval", 2.0)
    return RequestWatch(HANDLE, clock=clock, **options)


def test_pending_polls_again_after_the_interval_and_completed_fetches():
    clock = Clock()
    w = watch(clock)
    assert w.after_status(status(IN_QUEUE, queue_position=3)) == PollAfter(2.0)
    assert w.after_status(status(IN_PROGRESS)) == PollAfter(2.0)
    assert w.after_status(status(COMPLETED)) == FetchResult()


def test_completed_with_an_error_reads_the_result_and_classifies_the_error_type_like_a_sync_answer():
    step = watch(Clock()).after_status(status(COMPLETED, error="CUDA out of memory", error_type="runner_server_error"))
    assert isinstance(step, FetchResult) and isinstance(step.failure, FalServerError)
    assert not step.failure.permanent and not step.failure.retryable
    assert str(step.failure).startswith("fal request req-1 for fal-ai/flux/dev failed: fal server error: CUDA out of")
    bad = watch(Clock()).after_status(status(COMPLETED, error="bad input", error_type="bad_request"))
    assert isinstance(bad.failure, FalClientError) and bad.failure.permanent
    resendable = watch(Clock()).after_status(status(COMPLETED, error="gone", error_type="runner_disconnected"))
    assert isinstance(resendable.failure, FalTransientError) and resendable.failure.retryable


def test_the_deadline_cancels_and_a_cancelled_request_fails_with_a_timeout_that_says_so():
    clock = Clock()
    w = watch(clock, deadline=clock.now + 5, deadline_reason="poll_timeout of 5 s")
    assert w.after_status(status(IN_PROGRESS)) == PollAfter(2.0)
    clock.now += 4
    assert w.after_status(status(IN_PROGRESS)) == PollAfter(1.0)  # never sleeps past the deadline
    clock.now += 1
    assert w.after_status(status(IN_PROGRESS)) == CancelNow()
    assert w.after_cancel(CANCELLATION_REQUESTED) == PollAfter(1.0)  # a cancel is a request: see what happens
    step = w.after_status(status(COMPLETED, error="Request cancelled", error_type="client_cancelled"))
    assert isinstance(step, Fail) and isinstance(step.error, FalTimeoutError)
    assert str(step.error).startswith(
        "fal request req-1 for fal-ai/flux/dev did not complete within poll_timeout of 5 s"
    )
    assert "the request was cancelled" in str(step.error)


def test_a_running_request_that_completes_despite_the_cancel_is_delivered_not_dropped():
    clock = Clock()
    w = watch(clock, deadline=clock.now)
    assert w.after_status(status(IN_PROGRESS)) == CancelNow()
    assert w.after_cancel(CANCELLATION_REQUESTED) == PollAfter(1.0)
    clock.now += 1
    assert w.after_status(status(IN_PROGRESS)) == PollAfter(1.0)
    assert w.after_status(status(COMPLETED)) == FetchResult(late=True)


def test_a_request_still_running_long_after_the_cancel_fails_saying_it_may_still_be_billed():
    clock = Clock()
    w = watch(clock, deadline=clock.now, poll_interval=0.2)
    w.after_status(status(IN_PROGRESS))
    assert w.after_cancel(CANCELLATION_REQUESTED) == PollAfter(0.2)
    clock.now += CANCEL_CONFIRM_WINDOW
    step = w.after_status(status(IN_PROGRESS))
    assert isinstance(step, Fail) and isinstance(step.error, FalTimeoutError)
    assert "asked to cancel, but was still IN_PROGRESS 30 s later" in str(step.error)
    assert "fal bills it if it does" in str(step.error)


def test_a_cancel_that_answers_already_completed_fetches_the_paid_result():
    clock = Clock()
    w = watch(clock, deadline=clock.now)
    assert w.after_status(status(IN_PROGRESS)) == CancelNow()
    assert w.after_cancel(ALREADY_COMPLETED) == PollAfter(0.0)  # read the status once more, at once
    assert w.after_status(status(COMPLETED)) == FetchResult()


def test_already_completed_that_turns_out_failed_reports_the_models_error_not_a_timeout():
    clock = Clock()
    w = watch(clock, deadline=clock.now)
    w.after_status(status(IN_PROGRESS))
    w.after_cancel(ALREADY_COMPLETED)
    step = w.after_status(status(COMPLETED, error="boom", error_type="runner_server_error"))
    assert isinstance(step, FetchResult) and isinstance(step.failure, FalServerError)


def test_already_completed_while_the_status_still_says_pending_gives_up_with_a_timeout():
    clock = Clock()
    w = watch(clock, deadline=clock.now)
    w.after_status(status(IN_PROGRESS))
    w.after_cancel(ALREADY_COMPLETED)
    step = w.after_status(status(IN_PROGRESS))
    assert isinstance(step, Fail) and isinstance(step.error, FalTimeoutError)
    assert "not cancelled (fal says it already completed)" in str(step.error)


def test_a_cancel_that_failed_is_named_in_the_timeout():
    clock = Clock()
    w = watch(clock, deadline=clock.now)
    w.after_status(status(IN_PROGRESS))
    step = w.after_cancel(FalServerError("fal is down", status_code=500))
    assert isinstance(step, Fail) and isinstance(step.error, FalTimeoutError)
    assert "not cancelled (fal is down (HTTP 500))" in str(step.error)


def test_without_cancel_on_timeout_the_request_is_left_running():
    clock = Clock()
    w = watch(clock, deadline=clock.now, cancel_on_timeout=False)
    step = w.after_status(status(IN_PROGRESS))
    assert isinstance(step, Fail) and "the request was left running" in str(step.error)


def test_retryable_poll_failures_back_off_then_give_up_after_the_grace_period():
    clock = Clock()
    w = watch(clock)
    error = FalTransientError("bad gateway", status_code=502)
    error.retryable = True
    pauses = []
    for _ in range(8):
        step = w.after_poll_error(error)
        assert isinstance(step, PollAfter)
        pauses.append(step.seconds)
        clock.now += step.seconds
    assert pauses[:3] == [4.0, 8.0, 16.0] and max(pauses) == MAX_POLL_BACKOFF
    clock.now += POLL_FAILURE_GRACE
    assert w.after_poll_error(error) == Fail(error)


def test_a_good_status_resets_the_backoff():
    clock = Clock()
    w = watch(clock)
    error = FalTransientError("bad gateway", status_code=502)
    error.retryable = True
    w.after_poll_error(error)
    w.after_poll_error(error)
    w.after_status(status(IN_PROGRESS))
    assert w.after_poll_error(error) == PollAfter(4.0)


def test_a_permanent_poll_failure_cancels_the_request_then_ends_the_wait_saying_so():
    error = FalAuthError("bad key", status_code=401)
    w = watch(Clock())
    assert w.after_poll_error(error) == CancelNow()
    step = w.after_cancel(CANCELLATION_REQUESTED)
    assert step == Fail(error) and "asked to cancel (fal answered CANCELLATION_REQUESTED)" in str(step.error)


def test_a_permanent_poll_failure_fetches_the_result_if_the_cancel_says_it_already_completed():
    w = watch(Clock())
    assert w.after_poll_error(FalAuthError("bad key", status_code=401)) == CancelNow()
    assert w.after_cancel(ALREADY_COMPLETED) == FetchResult(late=True)


def test_a_permanent_poll_failure_without_cancel_on_timeout_ends_the_wait_at_once():
    error = FalAuthError("bad key", status_code=401)
    assert watch(Clock(), cancel_on_timeout=False).after_poll_error(error) == Fail(error)


def test_poll_failures_past_the_deadline_cancel():
    clock = Clock()
    w = watch(clock, deadline=clock.now + 1)
    error = FalTransientError("bad gateway", status_code=502)
    error.retryable = True
    clock.now += 2
    assert w.after_poll_error(error) == CancelNow()


@pytest.mark.parametrize("age", [0.0, 60.0, 3600.0])
def test_poll_delay_and_jitter_shape_the_pause(age):
    clock = Clock()
    w = watch(clock, poll_delay=lambda seen: 2.0 + seen / 60, jitter=0.1)
    clock.now += age
    step = w.after_status(status(IN_PROGRESS))
    expected = 2.0 + age / 60
    assert isinstance(step, PollAfter) and expected * 0.9 <= step.seconds <= expected * 1.1
