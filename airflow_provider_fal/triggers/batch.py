"""FalBatchTrigger: poll every queued request of a deferred batch from the triggerer, in one trigger.

One trigger per batch, not per input (Airflow's triggerer runs 1,000 triggers by default). It
only polls statuses, with backoff per request (every ``poll_interval`` at first, then a tenth
of the request's age, at most 30 s apart), at most ``concurrency`` polls in flight. Requests
that end are handed back to the task in the event, as indexes and what the worker needs to
fetch them, never their outputs: the worker fetches, stores and records them, then defers
again with the rest. It hands back as soon as ``hand_back_after`` seconds have passed since
the first request ended (default 30 s), or once every request ended, or ``max_hand_back`` ended.

With ``results_at`` (a batch with ``output_path``), the trigger also reads each ended
request's result at once and records it in the batch's progress folder before handing the
request back (see :mod:`~airflow_provider_fal.triggers.batch_results`): fal keeps a result of
10 KB or more only 6 minutes, and the task may wait longer than that for a worker slot. The
task then only stores the media. Recorded results are not listed in the event (the task finds
them in the folder), and nothing expires while they wait, so they are handed back less often:
``recorded_hand_back_after`` seconds after the first was recorded (default 120 s: their media
URLs still have to be stored while fal keeps them). A result the trigger cannot read or record
is handed back unread, on the ``hand_back_after`` clock, and the task reads it, as it does
every result without ``results_at``.

A running request is polled by how long it has run (the same backoff from the moment it was
first seen running), not by how long it waited in the queue before. Requests waiting in fal's
queue are not polled blindly: fal answers their ``queue_position``, and the trigger measures
how fast the line moves (:class:`~airflow_provider_fal.triggers.queue_pace.QueuePace`, passed
on from one round to the next as ``rate_hint``), so a request is polled again at about nine
tenths of its expected wait (at least ``poll_interval``, at most two minutes apart); at the
start of a round, requests are first polled in submit order at the times the rate predicts.
A batch of 10,000 behind an account limit of 40 then costs a few polls per request instead of
one every 30 s.

A triggerer restart runs a new copy with the same arguments: it polls again and never
submits (nothing here can submit). Each request is watched by the same
:class:`~airflow_provider_fal.core.watch.RequestWatch` as everywhere else.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async

from airflow_provider_fal.batch.scheduling import next_poll_delay
from airflow_provider_fal.core.async_client import AsyncQueueClient, shared_http
from airflow_provider_fal.core.client import DEFAULT_POLL_INTERVAL
from airflow_provider_fal.core.http import FalResponse
from airflow_provider_fal.core.queue import IN_PROGRESS, IN_QUEUE, QueueHandle
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.core.watch import CancelNow, Fail, FetchResult, PollAfter, RequestWatch
from airflow_provider_fal.exceptions import FalError, FalTriggererConnectionError
from airflow_provider_fal.hooks.fal import FalHook
from airflow_provider_fal.triggers.batch_results import TriggerResults
from airflow_provider_fal.triggers.queue_pace import QueuePace

BATCH_TRIGGER_PATH = "airflow_provider_fal.triggers.batch.FalBatchTrigger"
DEFAULT_HAND_BACK_AFTER = 30.0
DEFAULT_RECORDED_HAND_BACK_AFTER = 120.0
DEFAULT_MAX_HAND_BACK = 1000
POLL_JITTER = 0.1
#: Results read by the trigger are recorded once this many wait, or once the first has waited
#: :data:`SAVE_RESULTS_AFTER` seconds (and always before handing back): one object per group.
SAVE_RESULTS_AT = 500
SAVE_RESULTS_AFTER = 5.0


class FalBatchTrigger(BaseTrigger):
    """Poll the queued requests of one batch; fire once some (or all) of them ended.

    The event is ``{"status": "ready", "ready": {index: entry}, "recorded": n, "polls": n, "started_at": t}``
    (``recorded``: results the trigger recorded in the batch's progress, not listed in ``ready``);
    each entry is ``{"request_id", "error": error dict}`` for a request that failed for good
    without a result to read, else ``{"request_id", "failure": error dict | None, "late": bool}``
    for one whose result is to be fetched (``failure``: the status said it failed; the result
    read raises the model's error). ``{"status": "error",
    "error": ...}`` when the triggerer cannot read the connection (the requests keep running).

    :param requests: ``{input index (str): fal request id}`` of the requests to poll.
    :param model_id: the batch's model (the queue URLs are rebuilt from its app id).
    :param results_at: where the batch's progress folder is
        (:func:`~airflow_provider_fal.triggers.batch_results.results_location`), for the trigger
        to record the results it reads; ``None``: hand every ended request back unread.
    :param attempt: the task's try number (whose remembered inputs the records belong to).
    """

    def __init__(
        self,
        *,
        requests: dict[str, str],
        model_id: str,
        fal_conn_id: str = "fal_default",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        hand_back_after: float = DEFAULT_HAND_BACK_AFTER,
        max_hand_back: int = DEFAULT_MAX_HAND_BACK,
        recorded_hand_back_after: float = DEFAULT_RECORDED_HAND_BACK_AFTER,
        concurrency: int = 16,
        retry_policy: RetryPolicy | dict[str, Any] | None = None,
        timeout: float | None = None,
        started_at: float | None = None,
        rate_hint: float | None = None,
        results_at: dict[str, str] | None = None,
        attempt: int = 0,
    ) -> None:
        super().__init__()
        self.results_at = dict(results_at) if results_at else None
        self.attempt = int(attempt)
        #: requests completed per second in the previous round (pacing polls of queued requests)
        self.rate_hint = float(rate_hint) if rate_hint else None
        #: when the batch began (Unix time), echoed in the event for the batch's elapsed time
        self.started_at = started_at
        self.requests = {str(index): str(request_id) for index, request_id in requests.items()}
        self.model_id = model_id
        self.fal_conn_id = fal_conn_id
        self.poll_interval = float(poll_interval)
        self.hand_back_after = float(hand_back_after)
        self.max_hand_back = int(max_hand_back)
        self.recorded_hand_back_after = float(recorded_hand_back_after)
        self.concurrency = max(1, int(concurrency))
        self.retry_policy = RetryPolicy.from_value(retry_policy)
        self.timeout = None if timeout is None else float(timeout)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            BATCH_TRIGGER_PATH,
            {
                "requests": self.requests,
                "model_id": self.model_id,
                "fal_conn_id": self.fal_conn_id,
                "poll_interval": self.poll_interval,
                "hand_back_after": self.hand_back_after,
                "max_hand_back": self.max_hand_back,
                "recorded_hand_back_after": self.recorded_hand_back_after,
                "concurrency": self.concurrency,
                "retry_policy": self.retry_policy.to_dict(),
                "timeout": self.timeout,
                "started_at": self.started_at,
                "rate_hint": self.rate_hint,
                "results_at": self.results_at,
                "attempt": self.attempt,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = FalHook(fal_conn_id=self.fal_conn_id, retry_policy=self.retry_policy, timeout=self.timeout)
        try:
            settings = await hook.aget_settings()
        except FalError as error:
            failure = FalTriggererConnectionError(
                f"The triggerer could not read the fal connection {self.fal_conn_id!r}: {error.message} The "
                "triggerer needs the same fal connection as the workers (the same AIRFLOW_CONN_* variable or "
                f"secrets backend). The batch's {len(self.requests)} fal requests keep running; a retry of the "
                "task polls them again."
            )
            self.log.error("%s", failure)
            yield TriggerEvent({"status": "error", "error": failure.to_dict()})
            return
        async with shared_http(settings.api_key, shard=self.model_id) as http:
            client = hook.async_client(http, settings, self.log)
            handles = {
                index: QueueHandle.rebuild(settings.queue_url, self.model_id, request_id)
                for index, request_id in self.requests.items()
            }
            event = await self._poll_all(client, handles, await self._open_results())
        yield TriggerEvent(event)

    async def _open_results(self) -> TriggerResults | None:
        """The batch's progress folder, to record results in; ``None`` when there is none or it cannot be read."""
        if self.results_at is None:
            return None
        results = TriggerResults(self.results_at, self.attempt)
        try:
            await sync_to_async(results.open)(self.model_id)
        except Exception as error:
            self.log.warning(
                "The batch's results are handed back unread (the task reads them): its progress in %s cannot be "
                "opened from the triggerer (%s)",
                results.where,
                error,
            )
            return None
        return results

    async def _poll_all(
        self, client: AsyncQueueClient, handles: dict[str, QueueHandle], results: TriggerResults | None
    ) -> dict[str, Any]:
        watches = {
            index: RequestWatch(
                handle,
                poll_interval=self.poll_interval,
                deadline=None,
                deadline_reason="its deadline",
                clock=time.time,
                jitter=POLL_JITTER,
                poll_delay=lambda age: next_poll_delay(self.poll_interval, age),
            )
            for index, handle in handles.items()
        }
        pace = QueuePace(self.rate_hint)
        due = pace.first_polls(sorted(handles, key=int))
        ready: dict[str, dict[str, Any]] = {}
        read = ReadResults(self, results)
        first_ready_at: float | None = None
        polls = 0
        gate = asyncio.Semaphore(self.concurrency)
        running_since: dict[str, float] = {}  # when each request was first seen running

        async def poll(index: str) -> tuple[str, Any]:
            async with gate:
                watch = watches[index]
                try:
                    status = await client.status(handles[index], logs=False)
                except FalError as error:
                    return index, watch.after_poll_error(error)
                step = watch.after_status(status)
                if isinstance(step, CancelNow):  # no deadline is set, so this is not expected: poll again
                    return index, None
                if isinstance(step, FetchResult) and read.active:
                    return index, await read.fetch(client, handles[index], step)
                if isinstance(step, PollAfter) and status.status == IN_QUEUE and status.queue_position is not None:
                    pace.observe(index, status.queue_position)
                    expected = pace.queued_delay(status.queue_position)
                    if expected is not None:  # its expected wait, not the age-based backoff
                        step = PollAfter(max(expected, self.poll_interval))
                elif isinstance(step, PollAfter) and status.status == IN_PROGRESS:
                    # paced by how long it has run, not by how long it waited in the queue before
                    ran = time.time() - running_since.setdefault(index, time.time())
                    step = PollAfter(min(step.seconds, next_poll_delay(self.poll_interval, ran)))
                return index, step

        self.log.info("Polling %d fal requests of the batch", len(handles))
        while due:
            now = time.time()
            batch = []
            while due and due[0][0] <= now:
                batch.append(heapq.heappop(due)[1])
            if batch:
                polls += len(batch)
                for index, step in await asyncio.gather(*(poll(index) for index in batch)):
                    if isinstance(step, (FetchResult, Fail, FalResponse)):
                        pace.completions += 1
                    if isinstance(step, FalResponse):
                        read.keep(index, step)
                    elif isinstance(step, FetchResult):
                        ready[index] = self._unread(index, step)
                    elif isinstance(step, Fail):
                        ready[index] = {"request_id": self.requests[index], "error": step.error.to_dict()}
                    else:
                        delay = step.seconds if step is not None else self.poll_interval
                        heapq.heappush(due, (time.time() + delay, index))
                if read.due():
                    await read.save(ready)  # what it cannot record goes into ready, unread
                if ready and first_ready_at is None:
                    first_ready_at = time.time()
            now = time.time()
            if (ready or read.first_kept_at is not None) and (
                not due
                or len(ready) >= self.max_hand_back
                or now - (first_ready_at or now) >= self.hand_back_after
                or now - (read.first_kept_at or now) >= self.recorded_hand_back_after
            ):
                break
            if due:
                until = due[0][0]
                if first_ready_at is not None:
                    until = min(until, first_ready_at + self.hand_back_after)
                if read.first_kept_at is not None:
                    until = min(until, read.first_kept_at + self.recorded_hand_back_after)
                if read.waiting_since is not None:
                    until = min(until, read.waiting_since + SAVE_RESULTS_AFTER)
                await asyncio.sleep(max(0.0, min(until - time.time(), self.hand_back_after)))
        await read.save(ready)
        self.log.info(
            "%d of %d fal requests ended; handing them back to the task (%d polls, %d results recorded in %s)",
            len(ready) + read.saved,
            len(handles),
            polls,
            read.saved,
            results.where if results is not None else "none",
        )
        return {
            "status": "ready",
            "ready": ready,
            "recorded": read.saved,
            "polls": polls,
            "started_at": self.started_at,
            "rate": pace.rate,
        }

    def _unread(self, index: str, step: FetchResult) -> dict[str, Any]:
        """The event entry of an ended request whose result the task reads."""
        failure = step.failure.to_dict() if step.failure is not None else None
        return {"request_id": self.requests[index], "failure": failure, "late": step.late}


class ReadResults:
    """The results a trigger read and has not recorded yet; recorded in groups (see :data:`SAVE_RESULTS_AT`)."""

    def __init__(self, trigger: FalBatchTrigger, results: TriggerResults | None) -> None:
        self.trigger = trigger
        self.results = results
        self.waiting: dict[str, FalResponse] = {}
        #: when the oldest result still waiting to be recorded was read
        self.waiting_since: float | None = None
        #: when the first result of this round was read (the ``recorded_hand_back_after`` clock)
        self.first_kept_at: float | None = None
        self.saved = 0

    @property
    def active(self) -> bool:
        return self.results is not None

    async def fetch(
        self, client: AsyncQueueClient, handle: QueueHandle, step: FetchResult
    ) -> FalResponse | FetchResult:
        """The result; ``step`` itself when it could not be read (a failed request's error, a
        failed read): the task reads it, and what it gets is the input's outcome, as without
        ``results_at``."""
        try:
            return await client.fetch(handle, step)
        except FalError as error:
            if step.failure is None:
                self.trigger.log.warning(
                    "Reading the result of fal request %s failed (%s); the task reads it", handle.request_id, error
                )
            return step

    def keep(self, index: str, response: FalResponse) -> None:
        self.waiting[index] = response
        if self.waiting_since is None:
            self.waiting_since = time.time()
        if self.first_kept_at is None:
            self.first_kept_at = self.waiting_since

    def due(self) -> bool:
        return bool(self.waiting) and (
            len(self.waiting) >= SAVE_RESULTS_AT or time.time() - (self.waiting_since or 0.0) >= SAVE_RESULTS_AFTER
        )

    async def save(self, ready: dict[str, dict[str, Any]]) -> None:
        """Record every waiting result; when that fails, they (and all later ones) are handed back unread."""
        if not self.waiting:
            return
        waiting, self.waiting, self.waiting_since = self.waiting, {}, None
        assert self.results is not None
        try:
            await sync_to_async(self.results.save)({int(index): response for index, response in waiting.items()})
        except Exception as error:
            self.trigger.log.warning(
                "Could not record %d results in %s (%s); they are handed back unread, and the task reads them",
                len(waiting),
                self.results.where,
                error,
            )
            self.results = None
            for index in waiting:
                ready[index] = self.trigger._unread(index, FetchResult())
            return
        self.saved += len(waiting)
