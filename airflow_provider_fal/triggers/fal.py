"""FalQueueTrigger: poll a queued fal request from Airflow's triggerer, without a worker slot.

The worker submits the request (once) and defers; this trigger only polls, so a triggerer
restart or a second copy of the trigger polls the same request again and never submits a new
one. It is async all the way down: the connection through :meth:`FalHook.async_queue_client
<airflow_provider_fal.hooks.fal.FalHook.async_queue_client>` (Airflow's async connection API,
``httpx``), and what to do after each answer through the same
:class:`~airflow_provider_fal.core.watch.RequestWatch` as the worker-side wait and the batch.

As soon as fal reports ``COMPLETED`` the trigger fetches the result itself (fal keeps results
of 10 KB or more for only 6 minutes) and hands it to the task in its event; so does a deadline
whose cancel answers that the request had already completed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_fal.core.async_client import AsyncQueueClient
from airflow_provider_fal.core.client import DEFAULT_POLL_INTERVAL
from airflow_provider_fal.core.queue import QueueHandle, QueueProgress
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.core.watch import CancelNow, Fail, FetchResult, RequestWatch
from airflow_provider_fal.exceptions import FalError, FalTimeoutError, FalTriggererConnectionError
from airflow_provider_fal.hooks.fal import FalHook

TRIGGER_PATH = "airflow_provider_fal.triggers.fal.FalQueueTrigger"
#: Spread of each pause between polls (+-10 %): triggers resumed together (e.g. after a
#: triggerer restart) drift apart instead of polling fal in synchronized bursts.
POLL_JITTER = 0.1


class FalQueueTrigger(BaseTrigger):
    """Poll a fal queue request until it completes, fails or runs out of time.

    Fires one event, a dict with ``status`` (``"success"`` or ``"error"``), ``request_id``,
    ``request`` (the handle as a dict) and either ``output`` (the model's JSON result, fetched
    the moment fal reports COMPLETED) or ``error`` (a :class:`FalError` as a dict).

    :param request: the :class:`QueueHandle` as a dict (``handle.to_dict()``).
    :param fal_conn_id: the fal connection; its API key is read in the triggerer and never
        stored in the trigger's arguments.
    :param poll_interval: seconds between status polls.
    :param deadline: Unix time after which the request is cancelled and the trigger fails
        with :class:`FalTimeoutError`; None waits as long as fal keeps the request.
    :param deadline_reason: what set the deadline, for the error message.
    :param logs: ask for runner logs and copy new lines to the task log.
    :param retry_policy: a :class:`RetryPolicy` (or a dict of its fields) for each HTTP call.
    :param timeout: read timeout of one HTTP call, seconds.
    """

    def __init__(
        self,
        *,
        request: dict[str, Any],
        fal_conn_id: str = "fal_default",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        deadline: float | None = None,
        deadline_reason: str | None = None,
        logs: bool = True,
        retry_policy: RetryPolicy | dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.request = dict(request)
        self.fal_conn_id = fal_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.deadline_reason = deadline_reason
        self.logs = bool(logs)
        self.retry_policy = RetryPolicy.from_value(retry_policy)
        self.timeout = None if timeout is None else float(timeout)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            TRIGGER_PATH,
            {
                "request": self.request,
                "fal_conn_id": self.fal_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "deadline_reason": self.deadline_reason,
                "logs": self.logs,
                "retry_policy": self.retry_policy.to_dict(),
                "timeout": self.timeout,
            },
        )

    @property
    def request_id(self) -> str | None:
        return self.request.get("request_id")

    def _hook(self) -> FalHook:
        return FalHook(fal_conn_id=self.fal_conn_id, retry_policy=self.retry_policy, timeout=self.timeout)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self._hook()
        try:
            await hook.aget_settings()
        except FalError as error:
            yield TriggerEvent(self._error_event(self._connection_error(error)))
            return
        try:
            async with hook.async_queue_client(self.request, logger=self.log) as (client, handle):
                event = await self._poll(client, handle)
        except FalError as error:
            event = self._error_event(error)
        yield TriggerEvent(event)

    def _connection_error(self, error: FalError) -> FalTriggererConnectionError:
        """A connection the triggerer cannot read: a retryable error that says where it is missing."""
        failure = FalTriggererConnectionError(
            f"The triggerer could not read the fal connection {self.fal_conn_id!r}: {error.message} "
            f"The triggerer needs the same fal connection as the workers (the same AIRFLOW_CONN_* variable "
            f"or secrets backend). fal request {self.request_id} keeps running; a retry of the task "
            "reattaches to it.",
            request_id=self.request_id,
        )
        self.log.error("%s", failure)
        return failure

    async def _poll(self, client: AsyncQueueClient, handle: QueueHandle) -> dict[str, Any]:
        watch = RequestWatch(
            handle,
            poll_interval=self.poll_interval,
            deadline=self.deadline,
            deadline_reason=self.deadline_reason or "its deadline",
            clock=time.time,  # the deadline is wall-clock time: it survives a triggerer restart
            jitter=POLL_JITTER,
        )
        progress = QueueProgress()
        while True:
            try:
                status = await client.status(handle, logs=self.logs)
            except FalError as error:
                step = watch.after_poll_error(error)
                if not isinstance(step, Fail):
                    self.log.warning("Polling fal request %s failed (%s); polling again", handle.request_id, error)
            else:
                for level, message in progress.updates(status):
                    self.log.log(level, "%s", message)
                step = watch.after_status(status)
            if isinstance(step, CancelNow):
                try:
                    answer: str | FalError = await client.cancel(handle)
                except FalError as error:
                    answer = error
                step = watch.after_cancel(answer)
            if isinstance(step, FetchResult):
                response = await client.fetch(handle, step)
                self.log.info("Fetched the result of fal request %s", handle.request_id)
                return {
                    "status": "success",
                    "request_id": handle.request_id,
                    "request": handle.to_dict(),
                    "output": response.output,
                    "billable_units": response.billable_units,
                }
            if isinstance(step, Fail):
                if isinstance(step.error, FalTimeoutError):
                    self.log.error("%s", step.error)
                return self._error_event(step.error)
            await asyncio.sleep(step.seconds)

    def _error_event(self, error: FalError) -> dict[str, Any]:
        return {
            "status": "error",
            "request_id": self.request_id,
            "request": self.request,
            "error": error.to_dict(),
        }

    async def on_kill(self) -> None:
        """Cancel the fal request when a user kills the deferred task (Airflow 3.3+).

        Not called on a triggerer restart or redistribution: the request keeps running and the
        next copy of this trigger polls it again. Airflow before 3.3 has no such hook.
        """
        async with self._hook().async_queue_client(self.request, logger=self.log) as (client, handle):
            outcome = await client.cancel(handle)
        self.log.info("Task killed: cancel of fal request %s answered %s", self.request_id, outcome)
