"""Queue mode ("submit all, poll all"): every input is put on fal's queue, then polled until done.

Waiting holds no connection: the workers share the submits and status polls of every request
(a due poll first, so results are fetched promptly), at most the limit's worth of HTTP calls
in flight. What to do after each answer about a request is decided by its
:class:`~airflow_provider_fal.core.watch.RequestWatch`, as for the worker-side wait and the
trigger: a ``poll_timeout`` cancels the request (a cancel answered ``ALREADY_COMPLETED``
fetches the paid result), failed polls back off within a grace period.

With durable progress (:class:`~airflow_provider_fal.batch.progress.BatchProgress`), a
"submitting" record is written just before each submit is sent and the request id as soon as
fal answers; requests an earlier try queued are polled from the start instead of resubmitted.
A submit whose answer is lost (sent, no answer, so no request id) is not sent again within the
batch: ``on_unknown_submit`` decides whether it fails for good or a retry resends it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from airflow_provider_fal.batch.attempts import SINGLE_ATTEMPT, LimitedAttempts
from airflow_provider_fal.batch.ledger import BatchLedger
from airflow_provider_fal.batch.progress import BatchProgress
from airflow_provider_fal.batch.results import FalNotSentError, error_entry, success_entry
from airflow_provider_fal.batch.scheduling import QueueWork, ScheduledPoll, next_poll_delay
from airflow_provider_fal.batch.unknown import answer_was_lost, unknown_outcome_error
from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.core.queue import QueueHandle
from airflow_provider_fal.core.request import FalRequest
from airflow_provider_fal.core.watch import CancelNow, Fail, FetchResult, PollAfter, RequestWatch
from airflow_provider_fal.exceptions import FalError

#: Seconds a killed batch spends cancelling its queued requests on fal.
CANCEL_DEADLINE = 20.0

Finished = tuple[dict[str, Any], FalError | None]


class QueueMode:
    """Submits ``items`` to fal's queue and polls them, from as many worker threads as call :meth:`work`.

    :param poll_interval: seconds between status polls of one request at first (see
        :func:`~airflow_provider_fal.batch.scheduling.next_poll_delay`).
    :param poll_timeout: seconds a request may take from submit to completion before it is
        cancelled and reported as failed (``None``: no limit).
    """

    def __init__(
        self,
        client: FalClient,
        items: Sequence[FalRequest],
        ledger: BatchLedger,
        attempts: LimitedAttempts,
        *,
        poll_interval: float,
        poll_timeout: float | None,
        log: Any,
        to_submit: Iterable[int] | None = None,
        reattach: Mapping[int, QueueHandle] | None = None,
        progress: BatchProgress | None = None,
        on_unknown_submit: str = "fail",
        submit_only: bool = False,
    ) -> None:
        self.client = client
        #: submit (and record) every input, poll none: a deferrable batch polls from the triggerer
        self.submit_only = submit_only
        self.items = items
        self.ledger = ledger
        self.attempts = attempts
        self.poll_interval = poll_interval
        self.poll_timeout = poll_timeout
        self.log = log
        self.progress = progress
        self.on_unknown_submit = on_unknown_submit
        self.queue = QueueWork(range(len(items)) if to_submit is None else to_submit)
        for index, handle in ({} if submit_only else reattach or {}).items():
            watch = self._watch(handle)
            self.queue.submitted(ScheduledPoll(watch.started, index, watch))  # polled at once

    @property
    def queued_on_fal(self) -> int:
        """Requests submitted and not finished yet."""
        return len(self.queue.outstanding)

    def work(self) -> None:
        """One worker thread: submit and poll until every input finished (or the batch aborts)."""
        queue = self.queue
        while (item := queue.take()) is not None:
            try:
                if isinstance(item, ScheduledPoll):
                    self._poll(item)
                else:
                    self._submit(item)
            except Exception as unexpected:  # a bug must not lose the input: report it as its result
                index = item.index if isinstance(item, ScheduledPoll) else item
                queue.finished(index)
                self.ledger.record_unexpected(index, unexpected)
            finally:
                queue.release()

    def stop(self, *, abort: bool) -> None:
        """Submit nothing more; with ``abort`` (a killed task) also cancel what is queued on fal.

        Without ``abort``, submitted requests are still polled to the end.
        """
        if abort:
            self.attempts.limit.close()
        self._cancel_on_fal(self.queue.stop(abort=abort, on_abort=self.ledger.mark_cancelled))

    # ------------------------------------------------------------------ submit and poll

    def _submit(self, index: int) -> None:
        sent_at: list[str] = []

        def enqueue() -> QueueHandle:
            if self.progress is not None:  # durable before the request leaves: a kill -9 now is noticed
                sent_at.append(self.progress.submitting(index))
            return self.client.enqueue(self.items[index], retry_policy=SINGLE_ATTEMPT)

        try:
            handle = self.attempts.send(index, enqueue)
        except FalNotSentError:
            return
        except FalError as error:
            if answer_was_lost(error):
                error = unknown_outcome_error(
                    self.ledger,
                    index,
                    self.items[index].model_id,
                    sent_at[-1] if sent_at else "an unknown time",
                    error,
                    on_unknown_submit=self.on_unknown_submit,
                    synchronous=False,
                )
            self.ledger.record(index, error_entry(index, error), error)
            return
        if self.progress is not None:
            self.progress.submitted(index, handle.request_id)
        if self.submit_only:
            return
        watch = self._watch(handle)
        self.queue.submitted(ScheduledPoll(watch.started + self.poll_interval, index, watch))

    def _watch(self, handle: QueueHandle) -> RequestWatch:
        now = time.monotonic()
        timeout = self.poll_timeout
        return RequestWatch(
            handle,
            poll_interval=self.poll_interval,
            deadline=None if timeout is None else now + timeout,
            deadline_reason=f"poll_timeout of {timeout:g} s" if timeout is not None else "its deadline",
            clock=time.monotonic,
            poll_delay=lambda age: next_poll_delay(self.poll_interval, age),
        )

    def _poll(self, poll: ScheduledPoll) -> None:
        limit = self.attempts.limit
        token = limit.acquire()
        if token is None:  # aborted: the request is cancelled on fal by stop()
            return
        try:
            outcome = self._next_step(poll)
        finally:
            limit.release(token)
        if isinstance(outcome, PollAfter):
            poll.due = time.monotonic() + outcome.seconds
            self.queue.submitted(poll)
            return
        self.queue.finished(poll.index)
        self.ledger.record(poll.index, *outcome)

    def _next_step(self, poll: ScheduledPoll) -> PollAfter | Finished:
        """Poll once (and cancel or fetch, when the watch says so): the input's entry, or when to poll again."""
        watch, handle = poll.watch, poll.handle
        try:
            status = self.client.status(handle, logs=False)
        except FalError as error:
            step = watch.after_poll_error(error)
        else:
            step = watch.after_status(status)
        if isinstance(step, CancelNow):
            step = watch.after_cancel(self.client.cancel_or_error(handle))
        if isinstance(step, FetchResult):
            try:
                response = self.client.fetch(handle, step)
            except FalError as error:
                return error_entry(poll.index, error), error
            return success_entry(poll.index, response.output, handle.request_id, response.billable_units), None
        if isinstance(step, Fail):
            return error_entry(poll.index, step.error), step.error
        return step

    # ------------------------------------------------------------------ a killed batch

    def _cancel_on_fal(self, handles: Mapping[int, QueueHandle]) -> None:
        """Cancel queued requests on fal, in parallel, for at most ``CANCEL_DEADLINE`` seconds.

        Their entries already say they were cancelled (they count as failed, not as unsent).
        """
        if not handles:
            return
        self.log.warning("fal batch: cancelling %d queued requests on fal", len(handles))
        pending = deque(handles.values())

        def cancel_some() -> None:
            while True:
                try:
                    handle = pending.popleft()
                except IndexError:
                    return
                try:
                    self.client.cancel(handle)
                except FalError as error:
                    self.log.warning("fal batch: could not cancel request %s: %s", handle.request_id, error)

        count = min(self.attempts.limit.maximum, len(handles))
        threads = [threading.Thread(target=cancel_some, daemon=True) for _ in range(count)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + CANCEL_DEADLINE
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
