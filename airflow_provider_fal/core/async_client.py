"""The polling half of fal's queue API on ``httpx``, for the triggerer's event loop.

:class:`AsyncQueueClient` reads statuses, fetches results and cancels, with the same answers
(:func:`~airflow_provider_fal.core.http.decode_answer`), handles and retry policy
(:func:`~airflow_provider_fal.core.retry.async_retrying`) as the synchronous client.
:func:`shared_http` lets the triggers of one event loop share a few keep-alive pools.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from airflow_provider_fal.core.bounded import DEFAULT_MAX_ANSWER_BYTES, check_announced, too_large
from airflow_provider_fal.core.http import (
    DEFAULT_CONNECT_TIMEOUT,
    MAX_ANSWER_SETTING,
    QUEUE_CALL_TIMEOUT,
    STATUS_POLL_RESENDABLE,
    FalResponse,
    base_headers,
    decode_answer,
    refused_header,
    short_reason,
)
from airflow_provider_fal.core.queue import (
    ALREADY_COMPLETED,
    GONE_STATUSES,
    QueueHandle,
    QueueStatus,
    cancel_outcome,
    gone_error,
    is_already_completed,
    parse_status,
)
from airflow_provider_fal.core.retry import RetryPolicy, async_retrying
from airflow_provider_fal.core.watch import LATE_RESULT, FetchResult
from airflow_provider_fal.exceptions import FalConfigurationError, FalConnectError, FalError, FalRequestLostError

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
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        logger: logging.Logger | None = None,
    ) -> None:
        self._http = http
        self.max_answer_bytes = int(max_answer_bytes)
        self._api_key = api_key
        self.queue_url = queue_url
        self.retry_policy = retry_policy or RetryPolicy()
        self.timeout = timeout
        self.log = logger or logging.getLogger(__name__)

    def __repr__(self) -> str:
        return f"AsyncQueueClient(queue_url={self.queue_url!r})"

    async def status(self, handle: QueueHandle, logs: bool = True) -> QueueStatus:
        params = {"logs": "1"} if logs else None
        response = await self.request("GET", handle.status_url, params, resend_statuses=STATUS_POLL_RESENDABLE)
        return parse_status(response.output, handle)

    async def result(self, handle: QueueHandle) -> FalResponse:
        """The result, read as :meth:`FalClient.result` reads it (a gone request: FalResultExpiredError)."""
        try:
            response = await self.request("GET", handle.response_url)
        except FalError as error:
            if error.status_code not in GONE_STATUSES:
                raise
            try:
                await self.status(handle, logs=False)
            except FalError as status_error:
                if status_error.status_code in GONE_STATUSES:
                    raise gone_error(handle, error) from None
            raise
        return FalResponse(
            response.output, response.request_id or handle.request_id, response.status_code, response.headers
        )

    async def fetch(self, handle: QueueHandle, step: FetchResult) -> FalResponse:
        """The result a :class:`FetchResult` step asks for, as :meth:`FalClient.fetch` reads it."""
        if step.late:
            self.log.warning(LATE_RESULT, handle.request_id)
        response = await self.result(handle)
        if step.failure is not None:
            raise step.failure
        return response

    async def cancel(self, handle: QueueHandle) -> str:
        """``CANCELLATION_REQUESTED`` or ``ALREADY_COMPLETED``, as the sync client answers."""
        try:
            response = await self.request("PUT", handle.cancel_url)
        except FalError as error:
            if is_already_completed(error):
                return ALREADY_COMPLETED
            raise
        return cancel_outcome(response.output)

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, str] | None = None,
        *,
        resend_statuses: frozenset[int] = frozenset(),
    ) -> FalResponse:
        """One idempotent call with retries; the decoded answer or a typed :class:`FalError`."""
        async for attempt in async_retrying(self.retry_policy, self.log, f"{method} {url}"):
            with attempt:
                return await self._send_once(method, url, params, resend_statuses)
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _send_once(
        self, method: str, url: str, params: dict[str, str] | None, resend_statuses: frozenset[int]
    ) -> FalResponse:
        # The whole exchange, body included, within one call's time limit: a trickle ends there.
        # (Checked between reads, each bounded by the read timeout, rather than with
        # asyncio.wait_for, which on Python < 3.12 can swallow a cancellation that arrives as the
        # call finishes: a triggerer stopping the trigger must always stop it.)
        limit = DEFAULT_CONNECT_TIMEOUT + self.timeout
        try:
            status, headers, content = await self._exchange(method, url, params, limit)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            raise FalConnectError(f"Could not connect to fal at {url}: {short_reason(error)}") from None
        except (httpx.LocalProtocolError, UnicodeEncodeError):  # h11's message quotes the header value
            raise FalConfigurationError(refused_header(url)) from None
        except (httpx.TimeoutException, httpx.TransportError) as error:
            lost = FalRequestLostError(f"No answer from {url} ({short_reason(error)}).")
            lost.retryable = True  # every call made here is safe to repeat
            raise lost from None
        except _DeadlinePassed:
            lost = FalRequestLostError(f"The answer from {url} did not finish arriving within {limit:g} s.")
            lost.retryable = True
            raise lost from None
        return decode_answer(status, headers, content, secret=self._api_key, resend_statuses=resend_statuses)

    async def _exchange(
        self, method: str, url: str, params: dict[str, str] | None, limit: float
    ) -> tuple[int, httpx.Headers, bytes]:
        """Send one call and read its answer, at most :attr:`max_answer_bytes` of it, within ``limit`` s."""
        what = f"The answer from {url}"
        deadline = time.monotonic() + limit
        async with self._http.stream(method, url, params=params, timeout=self.timeout) as response:
            check_announced(response.headers.get("Content-Length"), self.max_answer_bytes, what, MAX_ANSWER_SETTING)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_answer_bytes:
                    raise too_large(what, self.max_answer_bytes, MAX_ANSWER_SETTING)
                if time.monotonic() > deadline:
                    raise _DeadlinePassed
            return response.status_code, response.headers, bytes(body)


class _DeadlinePassed(Exception):
    """The answer was still arriving when the call's time limit passed."""


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
