"""FalBatchTrigger: poll every queued request of a deferred batch from the triggerer, in one trigger.

One trigger per batch, not per input (Airflow's triggerer runs 1,000 triggers by default). It
only polls statuses, with backoff per request (every ``poll_interval`` at first, then a tenth
of the request's age, at most 30 s apart), at most ``concurrency`` polls in flight. Requests
that end are handed back to the task in the event, as indexes and what the worker needs to
fetch them, never their outputs: the worker fetches, stores and records them, then defers
again with the rest. It hands back as soon as ``hand_back_after`` seconds have passed since
the first request ended (default 30 s: fal keeps results of 10 KB or more only 6 minutes), or
once every request ended, or ``max_hand_back`` ended.

Requests waiting in fal's queue are not polled blindly: fal answers their ``queue_position``,
and the trigger measures how fast the batch's requests complete (passed on from one round to
the next as ``rate_hint``), so a request is polled again at about nine tenths of its expected
wait (at most :data:`MAX_QUEUED_POLL_DELAY` apart); at the start of a round, requests are
first polled in submit order at the times the rate predicts. A batch of 10,000 behind an
account limit of 40 then costs a few polls per request instead of one every 30 s.

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

from airflow_provider_fal.batch.scheduling import next_poll_delay
from airflow_provider_fal.core.async_client import AsyncQueueClient, shared_http
from airflow_provider_fal.core.client import DEFAULT_POLL_INTERVAL
from airflow_provider_fal.core.queue import IN_QUEUE, QueueHandle
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.core.watch import CancelNow, Fail, FetchResult, PollAfter, RequestWatch
from airflow_provider_fal.exceptions import FalError, FalTriggererConnectionError
from airflow_provider_fal.hooks.fal import FalHook

BATCH_TRIGGER_PATH = "airflow_provider_fal.triggers.batch.FalBatchTrigger"
#: The longest pause between two polls of a request that waits in fal's queue, in seconds.
MAX_QUEUED_POLL_DELAY = 120.0
#: Completions seen before the trigger trusts its own measure of the queue's rate.
MIN_COMPLETIONS_FOR_RATE = 10
DEFAULT_HAND_BACK_AFTER = 30.0
DEFAULT_MAX_HAND_BACK = 1000
POLL_JITTER = 0.1


class FalBatchTrigger(BaseTrigger):
    """Poll the queued requests of one batch; fire once some (or all) of them ended.

    The event is ``{"status": "ready", "ready": {index: entry}, "polls": n, "started_at": t}``;
    each entry is ``{"request_id", "error": error dict}`` for a request that failed for good
    without a result to read, else ``{"request_id", "failure": error dict | None, "late": bool}``
    for one whose result is to be fetched (``failure``: the status said it failed; the result
    read raises the model's error). ``{"status": "error",
    "error": ...}`` when the triggerer cannot read the connection (the requests keep running).

    :param requests: ``{input index (str): fal request id}`` of the requests to poll.
    :param model_id: the batch's model (the queue URLs are rebuilt from its app id).
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
        concurrency: int = 16,
        retry_policy: RetryPolicy | dict[str, Any] | None = None,
        timeout: float | None = None,
        started_at: float | None = None,
        rate_hint: float | None = None,
    ) -> None:
        super().__init__()
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
                "concurrency": self.concurrency,
                "retry_policy": self.retry_policy.to_dict(),
                "timeout": self.timeout,
                "started_at": self.started_at,
                "rate_hint": self.rate_hint,
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
            event = await self._poll_all(client, handles)
        yield TriggerEvent(event)

    async def _poll_all(self, client: AsyncQueueClient, handles: dict[str, QueueHandle]) -> dict[str, Any]:
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
        first_ready_at: float | None = None
        polls = 0
        gate = asyncio.Semaphore(self.concurrency)

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
                if isinstance(step, PollAfter) and status.status == IN_QUEUE and status.queue_position:
                    expected = pace.queued_delay(status.queue_position)
                    if expected is not None and expected > step.seconds:
                        step = PollAfter(expected)
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
                    if isinstance(step, (FetchResult, Fail)):
                        pace.completions += 1
                    if isinstance(step, FetchResult):
                        failure = step.failure.to_dict() if step.failure is not None else None
                        ready[index] = {"request_id": self.requests[index], "failure": failure, "late": step.late}
                    elif isinstance(step, Fail):
                        ready[index] = {"request_id": self.requests[index], "error": step.error.to_dict()}
                    else:
                        delay = step.seconds if step is not None else self.poll_interval
                        heapq.heappush(due, (time.time() + delay, index))
                if ready and first_ready_at is None:
                    first_ready_at = time.time()
            if ready and (
                not due
                or len(ready) >= self.max_hand_back
                or time.time() - (first_ready_at or 0.0) >= self.hand_back_after
            ):
                break
            if due:
                until = due[0][0]
                if first_ready_at is not None:
                    until = min(until, first_ready_at + self.hand_back_after)
                await asyncio.sleep(max(0.0, min(until - time.time(), self.hand_back_after)))
        self.log.info(
            "%d of %d fal requests ended; handing them back to the task (%d polls)", len(ready), len(handles), polls
        )
        return {"status": "ready", "ready": ready, "polls": polls, "started_at": self.started_at, "rate": pace.rate}


class QueuePace:
    """How long a batch's request is expected to wait in fal's queue, from the rate its requests complete.

    fal's queue serves requests in order, at the pace the account's concurrency allows; a request
    at ``queue_position`` p starts in about p / rate seconds.
    """

    def __init__(self, rate_hint: float | None) -> None:
        self.rate_hint = rate_hint
        self.started = time.time()
        self.completions = 0

    @property
    def rate(self) -> float | None:
        """Requests completed per second: measured in this round once enough completed, else the hint."""
        elapsed = time.time() - self.started
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
        now = time.time()
        rate = self.rate_hint
        due = [
            (now + (min(MAX_QUEUED_POLL_DELAY, 0.9 * k / rate) if rate else 0.0), index)
            for k, index in enumerate(indexes)
        ]
        heapq.heapify(due)
        return due
