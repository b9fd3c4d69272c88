"""FalBatchTrigger: poll every queued request of a deferred batch from the triggerer, in one trigger.

One trigger per batch, not per input (Airflow's triggerer runs 1,000 triggers by default). It
only polls statuses, with backoff per request (every ``poll_interval`` at first, then a tenth
of the request's age, at most 30 s apart), at most ``concurrency`` polls in flight. Requests
that end are handed back to the task in the event, as indexes and what the worker needs to
fetch them, never their outputs: the worker fetches, stores and records them, then defers
again with the rest. It hands back as soon as ``hand_back_after`` seconds have passed since
the first request ended (default 30 s: fal keeps results of 10 KB or more only 6 minutes), or
once every request ended, or ``max_hand_back`` ended.

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
from airflow_provider_fal.core.http import queue_call_timeout
from airflow_provider_fal.core.queue import QueueHandle
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.core.watch import CancelNow, Fail, FetchResult, RequestWatch
from airflow_provider_fal.exceptions import FalError, FalTriggererConnectionError
from airflow_provider_fal.hooks.fal import FalHook

BATCH_TRIGGER_PATH = "airflow_provider_fal.triggers.batch.FalBatchTrigger"
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
    ) -> None:
        super().__init__()
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
            client = AsyncQueueClient(
                http,
                settings.api_key,
                queue_url=settings.queue_url,
                retry_policy=self.retry_policy,
                timeout=queue_call_timeout(hook.call_timeout(settings)),
                max_answer_bytes=settings.max_answer_bytes,
                logger=self.log,
            )
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
        due = [(time.time(), index) for index in handles]  # everything is polled once at the start
        heapq.heapify(due)
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
                await asyncio.sleep(max(0.0, min(due[0][0] - time.time(), self.hand_back_after)))
        self.log.info(
            "%d of %d fal requests ended; handing them back to the task (%d polls)", len(ready), len(handles), polls
        )
        return {"status": "ready", "ready": ready, "polls": polls, "started_at": self.started_at}
