"""The fal HTTP client: one reused ``requests.Session``, typed errors, retries, the queue.

:class:`FalClient` sends prepared requests (:class:`~airflow_provider_fal.core.request.FalRequest`)
as they are: :meth:`FalClient.send` runs one synchronously, :meth:`FalClient.enqueue` puts one on
fal's queue. :meth:`FalClient.run` and :meth:`FalClient.submit` prepare and send in one call.
:class:`FalHook` builds the client from a connection; the batch engine shares one across threads.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import requests

from airflow_provider_fal.core.bounded import DEFAULT_MAX_ANSWER_BYTES, positive_size
from airflow_provider_fal.core.http import (
    DEFAULT_CONNECT_TIMEOUT,
    QUEUE_CALL_TIMEOUT,
    STATUS_POLL_RESENDABLE,
    FalResponse,
    KeyAuth,
    base_headers,
    pooled_session,
    queue_call_timeout,
    send_once,
)
from airflow_provider_fal.core.queue import (
    ALREADY_COMPLETED,
    GONE_STATUSES,
    QueueHandle,
    QueueStatus,
    cancel_outcome,
    coerce_handle,
    gone_error,
    is_already_completed,
    parse_status,
)
from airflow_provider_fal.core.request import FalRequest, prepare_request
from airflow_provider_fal.core.retry import RetryPolicy, call_with_retries
from airflow_provider_fal.core.validation import MAX_CALL_SECONDS, clean_api_key, optional_seconds, validate_base_url
from airflow_provider_fal.core.watch import LATE_RESULT, CancelNow, Fail, FetchResult, RequestWatch
from airflow_provider_fal.exceptions import FalClientError, FalError

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "QUEUE_CALL_TIMEOUT", "FalClient", "FalRequest", "FalResponse", "prepare_request"]

DEFAULT_RUN_URL = "https://fal.run"
DEFAULT_QUEUE_URL = "https://queue.fal.run"
#: fal's own client has no read timeout, so a stuck call hangs a worker forever. Ours waits
#: 10 minutes for an answer (plus the start timeout, when one is given): long enough for a
#: synchronous image or short video, finite for everything else. Use the queue for longer.
DEFAULT_READ_TIMEOUT = 600.0
#: Seconds between two status polls of a queued request, and the default bound on waiting.
DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_WAIT_TIMEOUT = 3600.0
JSON_CONTENT = {"Content-Type": "application/json"}

log = logging.getLogger(__name__)


class FalClient:
    """Talks to fal's synchronous (and queue) hosts with one session and one retry policy."""

    def __init__(
        self,
        api_key: str,
        *,
        run_url: str = DEFAULT_RUN_URL,
        queue_url: str = DEFAULT_QUEUE_URL,
        retry_policy: RetryPolicy | dict[str, Any] | None = None,
        timeout: float | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        pool_maxsize: int = 10,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        logger: logging.Logger | None = None,
    ) -> None:
        self._api_key = clean_api_key(api_key, "the FalClient (its api_key)")
        self.run_url = validate_base_url(run_url, "run_url (connection host)")
        self.queue_url = validate_base_url(queue_url, "queue_url (connection extra)")
        self.retry_policy = RetryPolicy.from_value(retry_policy)
        self.timeout = optional_seconds(timeout, "timeout", MAX_CALL_SECONDS)
        self.connect_timeout = (
            optional_seconds(connect_timeout, "connect_timeout", MAX_CALL_SECONDS) or DEFAULT_CONNECT_TIMEOUT
        )
        self.pool_maxsize = max(1, int(pool_maxsize))
        self.max_answer_bytes = positive_size(max_answer_bytes, "max_answer_bytes")
        self.log = logger or log
        self._session: requests.Session | None = None
        self._session_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FalClient(run_url={self.run_url!r}, queue_url={self.queue_url!r})"

    @property
    def session(self) -> requests.Session:
        """The one HTTP session of this client, created on first use (under a lock: threads of a
        batch may ask at once, and each would otherwise build one and leak all but one)."""
        with self._session_lock:
            if self._session is None:
                self._session = pooled_session(self.pool_maxsize, base_headers(self._api_key))
                self._session.auth = KeyAuth(self._api_key)
            return self._session

    def close(self) -> None:
        with self._session_lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    def run_endpoint(self, model_id: str) -> str:
        """``{run_url}/{model_id}`` of a model id that :func:`prepare_request` checked."""
        return f"{self.run_url}/{model_id}"

    def read_timeout(self, timeout: Any = None, start_timeout: float | None = None) -> float:
        """The read timeout of one call: explicit, else the client's, else the default + start timeout."""
        explicit = optional_seconds(timeout, "timeout", MAX_CALL_SECONDS)
        if explicit is not None:
            return explicit
        if self.timeout is not None:
            return self.timeout
        return DEFAULT_READ_TIMEOUT + (start_timeout or 0.0)

    def run(
        self,
        model_id: str,
        arguments: Any = None,
        *,
        start_timeout: Any = None,
        object_lifecycle: Any = None,
        hint: Any = None,
        headers: Any = None,
        timeout: Any = None,
    ) -> FalResponse:
        """``POST {run_url}/{model_id}``: run a model synchronously and return its output.

        :func:`prepare_request` then :meth:`send`: every input is checked before anything is sent.
        """
        return self.send(
            prepare_request(
                model_id,
                arguments,
                start_timeout=start_timeout,
                object_lifecycle=object_lifecycle,
                hint=hint,
                headers=headers,
                timeout=timeout,
            )
        )

    def send(self, request: FalRequest, *, retry_policy: RetryPolicy | None = None) -> FalResponse:
        """Run a prepared request synchronously (``POST {run_url}/{model_id}``); retries follow :mod:`retry`."""
        return self.request(
            "POST",
            self.run_endpoint(request.model_id),
            body=request.body,
            headers=request.headers,
            read_timeout=self.read_timeout(request.timeout, request.start_timeout),
            retry_policy=retry_policy,
        )

    def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Any = None,
        read_timeout: float | None = None,
        idempotent: bool = False,
        retry_policy: RetryPolicy | None = None,
        resend_statuses: frozenset[int] = frozenset(),
    ) -> FalResponse:
        """Send one logical request with retries; return the decoded answer or raise a FalError.

        ``body`` is sent as JSON. ``idempotent`` requests (status polls, result fetches) are also
        retried when their answer was lost; a model run never is. ``retry_policy`` overrides the
        client's.
        """
        if body is not None:
            headers = {**headers, **JSON_CONTENT} if headers else JSON_CONTENT
        once = functools.partial(
            send_once,
            self.session,
            method,
            url,
            body=body,
            headers=headers,
            timeout=(self.connect_timeout, read_timeout or self.read_timeout()),
            idempotent=idempotent,
            secret=self._api_key,
            resend_statuses=resend_statuses,
            max_answer_bytes=self.max_answer_bytes,
        )
        return call_with_retries(retry_policy or self.retry_policy, self.log, f"{method} {url}", once)

    # ------------------------------------------------------------------ queue
    # Each queue method is one logical call on the shared session and keeps no state of its
    # own, so they are safe to call from several threads at once (e.g. a batch of requests).

    def queue_call_timeout(self) -> float:
        """Read timeout of a queue call: the client's ``timeout`` if set, else 60 s."""
        return queue_call_timeout(self.timeout)

    def as_handle(self, handle: QueueHandle | dict[str, Any]) -> QueueHandle:
        """A handle built here is used as it is; a dict (from XCom, a trigger, a store) is checked
        against this client's queue URL first."""
        return handle if isinstance(handle, QueueHandle) else coerce_handle(handle, self.queue_url)

    def queue_handle(self, model_id: str, request_id: str) -> QueueHandle:
        """The handle of an already submitted request, e.g. from a stored request id.

        URLs are rebuilt from the *app id* of ``model_id`` (never its subpath), as fal expects.
        """
        return QueueHandle.rebuild(self.queue_url, model_id, request_id)

    def submit(
        self,
        model_id: str,
        arguments: Any = None,
        *,
        start_timeout: Any = None,
        object_lifecycle: Any = None,
        hint: Any = None,
        priority: Any = None,
        webhook_url: Any = None,
        headers: Any = None,
    ) -> QueueHandle:
        """``POST {queue_url}/{model_id}``: put a model call on fal's queue; returns its handle.

        :func:`prepare_request` then :meth:`enqueue`: inputs are checked exactly as for :meth:`run`
        before anything is sent; ``priority`` (``"normal"``/``"low"``) becomes
        ``X-Fal-Queue-Priority`` and ``webhook_url`` the ``fal_webhook`` query parameter.
        """
        return self.enqueue(
            prepare_request(
                model_id,
                arguments,
                start_timeout=start_timeout,
                object_lifecycle=object_lifecycle,
                hint=hint,
                priority=priority,
                webhook_url=webhook_url,
                headers=headers,
            )
        )

    def enqueue(self, request: FalRequest, *, retry_policy: RetryPolicy | None = None) -> QueueHandle:
        """Put a prepared request on fal's queue and return its handle.

        The submit is retried like a synchronous run: only when fal says it did not take the
        request (429, 502/503/504, connection refused), never when the answer was lost, so one
        call never queues (and bills) the same input twice. The returned URLs are used only if
        they point at ``queue_url``.
        """
        url = f"{self.queue_url}/{request.model_id}"
        if request.webhook_url:
            url += "?fal_webhook=" + quote(request.webhook_url, safe="")
        response = self.request(
            "POST",
            url,
            body=request.body,
            headers=request.headers,
            read_timeout=self.queue_call_timeout(),
            retry_policy=retry_policy,
        )
        return QueueHandle.from_submit(response.output, queue_url=self.queue_url, model_id=request.model_id)

    def status(self, handle: QueueHandle | dict[str, Any], logs: bool = True) -> QueueStatus:
        """``GET`` the request's status (``?logs=1`` with ``logs``). Safe to retry, and retried."""
        handle = self.as_handle(handle)
        url = handle.status_url + ("?logs=1" if logs else "")
        response = self.request(
            "GET",
            url,
            read_timeout=self.queue_call_timeout(),
            idempotent=True,
            resend_statuses=STATUS_POLL_RESENDABLE,
        )
        return parse_status(response.output, handle)

    def result(self, handle: QueueHandle | dict[str, Any]) -> FalResponse:
        """``GET`` the output of a COMPLETED request, raising the model's error as a :class:`FalError`.

        fal keeps results 1 hour, only 6 minutes when they are 10 KB or more: fetch promptly. A
        404/410 for a request fal no longer knows (its status is gone too) raises
        :class:`FalResultExpiredError`; a 404 that is the model's own answer stays what it is.
        """
        handle = self.as_handle(handle)
        try:
            response = self.request("GET", handle.response_url, read_timeout=self.queue_call_timeout(), idempotent=True)
        except FalError as error:
            if error.status_code not in GONE_STATUSES:
                raise
            try:
                self.status(handle, logs=False)
            except FalError as status_error:
                if status_error.status_code in GONE_STATUSES:
                    raise gone_error(handle, error) from None
            raise
        return FalResponse(
            response.output, response.request_id or handle.request_id, response.status_code, response.headers
        )

    def cancel(self, handle: QueueHandle | dict[str, Any]) -> str:
        """``PUT`` the cancel URL; returns ``CANCELLATION_REQUESTED`` or ``ALREADY_COMPLETED``."""
        handle = self.as_handle(handle)
        try:
            response = self.request("PUT", handle.cancel_url, read_timeout=self.queue_call_timeout(), idempotent=True)
        except FalClientError as error:
            if is_already_completed(error):
                return ALREADY_COMPLETED
            raise
        return cancel_outcome(response.output)

    def wait(
        self,
        handle: QueueHandle | dict[str, Any],
        *,
        timeout: Any = DEFAULT_WAIT_TIMEOUT,
        poll_interval: Any = DEFAULT_POLL_INTERVAL,
        logs: bool = True,
        on_status: Callable[[QueueStatus], None] | None = None,
        cancel_on_timeout: bool = True,
        timeout_label: str = "timeout",
        deadline_reason: str | None = None,
    ) -> FalResponse:
        """Poll until the request completes and return its result, for at most ``timeout`` seconds.

        ``on_status`` sees every status (e.g. to log new runner lines with
        :class:`~airflow_provider_fal.core.queue.QueueProgress`). A request that failed raises the
        model's error, read from its result as a synchronous answer. When ``timeout`` runs out the
        request is cancelled (unless ``cancel_on_timeout=False``) and :class:`FalTimeoutError`
        raised, whose message names the limit as ``timeout_label`` (or says ``deadline_reason``);
        if fal answers that the request completed in the meantime, its result is returned instead
        of being thrown away. :class:`~airflow_provider_fal.core.watch.RequestWatch` decides what
        to do after each answer.
        """
        handle = self.as_handle(handle)
        limit = optional_seconds(timeout, "timeout") or DEFAULT_WAIT_TIMEOUT
        watch = RequestWatch(
            handle,
            poll_interval=optional_seconds(poll_interval, "poll_interval") or DEFAULT_POLL_INTERVAL,
            deadline=time.monotonic() + limit,
            deadline_reason=deadline_reason or f"{timeout_label} of {limit:g} s",
            cancel_on_timeout=cancel_on_timeout,
        )
        while True:
            try:
                status = self.status(handle, logs=logs)
            except FalError as error:
                step = watch.after_poll_error(error)
            else:
                if on_status is not None:
                    on_status(status)
                step = watch.after_status(status)
            if isinstance(step, CancelNow):
                step = watch.after_cancel(self.cancel_or_error(handle))
            if isinstance(step, FetchResult):
                return self.fetch(handle, step)
            if isinstance(step, Fail):
                raise step.error
            time.sleep(step.seconds)

    def fetch(self, handle: QueueHandle, step: FetchResult) -> FalResponse:
        """The result a :class:`FetchResult` step asks for (the model's error raised as a sync call's)."""
        if step.late:
            self.log.warning(LATE_RESULT, handle.request_id)
        response = self.result(handle)
        if step.failure is not None:  # the status said it failed, yet the result read as a success
            raise step.failure
        return response

    def cancel_or_error(self, handle: QueueHandle) -> str | FalError:
        """:meth:`cancel`, with a failure returned instead of raised (for a timeout's cancel)."""
        try:
            return self.cancel(handle)
        except FalError as error:
            return error

    def subscribe(
        self,
        model_id: str,
        arguments: Any = None,
        *,
        timeout: Any = DEFAULT_WAIT_TIMEOUT,
        poll_interval: Any = DEFAULT_POLL_INTERVAL,
        logs: bool = True,
        on_status: Callable[[QueueStatus], None] | None = None,
        **options: Any,
    ) -> FalResponse:
        """:meth:`submit` (``options`` as for :func:`prepare_request`) then :meth:`wait`: a queued
        run that survives dropped connections."""
        handle = self.enqueue(prepare_request(model_id, arguments, **options))
        return self.wait(handle, timeout=timeout, poll_interval=poll_interval, logs=logs, on_status=on_status)
