"""FalQueueTrigger: poll a queued fal request from Airflow's triggerer, without a worker slot.

The worker submits the request (once) and defers; this trigger only polls, so a triggerer
restart or a second copy of the trigger polls the same request again and never submits a new
one. It is async all the way down: HTTP through ``httpx`` (installed with Airflow), the
connection through Airflow's async connection API, and the same headers, error classes
(:func:`~airflow_provider_fal.core.classify.error_from_response`) and retry policy
(:func:`~airflow_provider_fal.core.retry.async_retrying`) as the synchronous client.

As soon as fal reports ``COMPLETED`` the trigger fetches the result itself (fal keeps results
of 10 KB or more for only 6 minutes) and hands it to the task in its event.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_fal.core.client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_POLL_INTERVAL,
    QUEUE_CALL_TIMEOUT,
    FalResponse,
    base_headers,
    decode_answer,
)
from airflow_provider_fal.core.queue import (
    ALREADY_COMPLETED,
    CANCELLATION_REQUESTED,
    QueueHandle,
    QueueProgress,
    QueueStatus,
    cancel_outcome,
    coerce_handle,
    is_already_completed,
    parse_status,
)
from airflow_provider_fal.core.retry import RetryPolicy, async_retrying
from airflow_provider_fal.exceptions import FalConnectError, FalError, FalRequestLostError, FalTimeoutError

TRIGGER_PATH = "airflow_provider_fal.triggers.fal.FalQueueTrigger"
#: How long polls may keep failing with retryable errors (after the retry policy gave up on
#: each) before the trigger reports the failure: a short fal or network outage costs nothing.
POLL_FAILURE_GRACE = 600.0
MAX_POLL_BACKOFF = 60.0
#: Connections to the queue host per event loop and API key: POOL_SHARDS pools of
#: POOL_CONNECTIONS each (see :func:`shared_http`).
POOL_SHARDS = 5
POOL_CONNECTIONS = 20


class AsyncQueueClient:
    """The polling half of fal's queue API on ``httpx``: status, result and cancel.

    Each call is idempotent, so lost answers and fal's retryable errors are retried with the
    given :class:`RetryPolicy`. ``http`` is an ``httpx.AsyncClient`` carrying
    :func:`~airflow_provider_fal.core.client.base_headers`; see :func:`shared_http`.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_key: str,
        *,
        queue_url: str,
        retry_policy: RetryPolicy | None = None,
        timeout: float = QUEUE_CALL_TIMEOUT,
        logger: logging.Logger | None = None,
    ) -> None:
        self._http = http
        self._api_key = api_key
        self.queue_url = queue_url
        self.retry_policy = retry_policy or RetryPolicy()
        self.timeout = timeout
        self.log = logger or logging.getLogger(__name__)

    def __repr__(self) -> str:
        return f"AsyncQueueClient(queue_url={self.queue_url!r})"

    async def status(self, handle: QueueHandle, logs: bool = True) -> QueueStatus:
        response = await self.request("GET", handle.status_url, params={"logs": "1"} if logs else None)
        return parse_status(response.output, handle)

    async def result(self, handle: QueueHandle) -> FalResponse:
        response = await self.request("GET", handle.response_url)
        return FalResponse(response.output, response.request_id or handle.request_id, response.status_code)

    async def cancel(self, handle: QueueHandle) -> str:
        """``CANCELLATION_REQUESTED`` or ``ALREADY_COMPLETED``, as the sync client answers."""
        try:
            response = await self.request("PUT", handle.cancel_url)
        except FalError as error:
            if is_already_completed(error):
                return ALREADY_COMPLETED
            raise
        return cancel_outcome(response.output)

    async def request(self, method: str, url: str, params: dict[str, str] | None = None) -> FalResponse:
        """One idempotent call with retries; the decoded answer or a typed :class:`FalError`."""
        async for attempt in async_retrying(self.retry_policy, self.log, f"{method} {url}"):
            with attempt:
                return await self._send_once(method, url, params)
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _send_once(self, method: str, url: str, params: dict[str, str] | None) -> FalResponse:
        try:
            response = await self._http.request(method, url, params=params, timeout=self.timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            raise FalConnectError(f"Could not connect to fal at {url}: {_reason(error)}") from None
        except (httpx.TimeoutException, httpx.TransportError) as error:
            lost = FalRequestLostError(f"No answer from {url} ({_reason(error)}).")
            lost.retryable = True  # every call made here is safe to repeat
            raise lost from None
        return decode_answer(response.status_code, response.headers, response.content, secret=self._api_key)


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."


@dataclass
class _SharedHttp:
    client: httpx.AsyncClient
    users: int = 0


_SHARED: dict[tuple[int, str, int], _SharedHttp] = {}


@asynccontextmanager
async def shared_http(
    api_key: str, shard: str = "", connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> AsyncIterator[httpx.AsyncClient]:
    """A ``httpx.AsyncClient`` shared by the triggers of one event loop and API key.

    Hundreds of deferred requests then reuse a few keep-alive connections instead of opening
    a pool each. The users are spread over :data:`POOL_SHARDS` clients by ``shard`` (a request
    id): httpx's pool scans all its connections on every request, so several small pools cost
    less CPU than one big one. A client closes when its last user leaves.
    """
    loop_id = id(asyncio.get_running_loop())
    pool = hashlib.sha256(shard.encode()).digest()[0] % POOL_SHARDS
    key = (loop_id, hashlib.sha256(api_key.encode()).hexdigest(), pool)
    shared = _SHARED.get(key)
    if shared is None or shared.client.is_closed:
        client = httpx.AsyncClient(
            headers=base_headers(api_key),
            timeout=httpx.Timeout(QUEUE_CALL_TIMEOUT, connect=connect_timeout),
            limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS),
            follow_redirects=False,
        )
        shared = _SHARED[key] = _SharedHttp(client)
    shared.users += 1
    try:
        yield shared.client
    finally:
        shared.users -= 1
        if shared.users == 0:
            if _SHARED.get(key) is shared:
                del _SHARED[key]
            await shared.client.aclose()


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
    :param retry_policy: a dict of :class:`RetryPolicy` fields for each HTTP call.
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
        retry_policy: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.request = dict(request)
        self.fal_conn_id = fal_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.deadline_reason = deadline_reason
        self.logs = bool(logs)
        self.retry_policy = RetryPolicy.from_value(retry_policy).to_dict()
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
                "retry_policy": self.retry_policy,
                "timeout": self.timeout,
            },
        )

    @property
    def request_id(self) -> str | None:
        return self.request.get("request_id")

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[tuple[AsyncQueueClient, QueueHandle]]:
        """The async client and the checked handle, from the connection looked up asynchronously."""
        from airflow_provider_fal.hooks.fal import FalHook

        settings = await FalHook(fal_conn_id=self.fal_conn_id).aget_settings()
        handle = coerce_handle(self.request, settings.queue_url)
        timeout = self.timeout or (float(settings.timeout) if settings.timeout else QUEUE_CALL_TIMEOUT)
        async with shared_http(settings.api_key, shard=handle.request_id) as http:
            client = AsyncQueueClient(
                http,
                settings.api_key,
                queue_url=settings.queue_url,
                retry_policy=RetryPolicy.from_value(self.retry_policy),
                timeout=timeout,
                logger=self.log,
            )
            yield client, handle

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            async with self._client() as (client, handle):
                event = await self._poll(client, handle)
        except FalError as error:
            event = self._error_event(error)
        yield TriggerEvent(event)

    async def _poll(self, client: AsyncQueueClient, handle: QueueHandle) -> dict[str, Any]:
        progress = QueueProgress()
        failing_since: float | None = None
        failures = 0
        while True:
            try:
                status = await client.status(handle, logs=self.logs)
            except FalError as error:
                if not error.retryable:
                    raise
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > POLL_FAILURE_GRACE:
                    raise
                failures += 1
                wait = min(MAX_POLL_BACKOFF, self.poll_interval * 2**failures)
                self.log.warning(
                    "Polling fal request %s failed (%s); polling again in %.0f s", self.request_id, error, wait
                )
                await self._sleep(wait)
                if self._expired():
                    return await self._time_out(client, handle)
                continue
            failing_since, failures = None, 0
            for level, message in progress.updates(status):
                self.log.log(level, "%s", message)
            failure = status.failure(handle)
            if failure is not None:
                return self._error_event(failure)
            if status.completed:
                response = await client.result(handle)
                self.log.info("Fetched the result of fal request %s", handle.request_id)
                return {
                    "status": "success",
                    "request_id": handle.request_id,
                    "request": handle.to_dict(),
                    "output": response.output,
                }
            if self._expired():
                return await self._time_out(client, handle)
            # +-10 % jitter: triggers resumed together (e.g. after a triggerer restart) drift apart
            # instead of polling fal in synchronized bursts.
            await self._sleep(self.poll_interval * random.uniform(0.9, 1.1))

    def _expired(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    async def _sleep(self, seconds: float) -> None:
        if self.deadline is not None:
            seconds = min(seconds, max(0.0, self.deadline - time.time()))
        await asyncio.sleep(seconds)

    async def _time_out(self, client: AsyncQueueClient, handle: QueueHandle) -> dict[str, Any]:
        try:
            outcome = await client.cancel(handle)
            what = "cancelled" if outcome == CANCELLATION_REQUESTED else "already completed, not cancelled"
        except FalError as error:
            what = f"not cancelled ({error})"
        reason = self.deadline_reason or "its deadline"
        error = FalTimeoutError(
            f"fal request {handle.request_id} for {handle.model_id} did not complete within {reason}; "
            f"the request was {what}.",
            request_id=handle.request_id,
        )
        self.log.error("%s", error)
        return self._error_event(error)

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
        async with self._client() as (client, handle):
            outcome = await client.cancel(handle)
        self.log.info("Task killed: cancel of fal request %s answered %s", self.request_id, outcome)
