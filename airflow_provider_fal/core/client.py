"""The fal HTTP client: one reused ``requests.Session``, platform headers, typed errors, retries.

Airflow-free: :class:`FalHook` builds a :class:`FalClient` from a connection, and the batch
operator shares one client across threads (``requests.Session`` with a sized pool).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from airflow_provider_fal import __version__
from airflow_provider_fal.core.classify import REQUEST_ID_HEADER, error_from_response
from airflow_provider_fal.core.queue import (
    ALREADY_COMPLETED,
    QueueHandle,
    QueueStatus,
    cancel_outcome,
    coerce_handle,
    coerce_webhook_url,
    is_already_completed,
    parse_status,
    submit_url,
)
from airflow_provider_fal.core.retry import RetryPolicy, retrying
from airflow_provider_fal.core.validation import (
    coerce_arguments,
    coerce_extra_headers,
    coerce_hint,
    coerce_object_lifecycle,
    coerce_priority,
    coerce_start_timeout,
    optional_seconds,
    validate_base_url,
    validate_model_id,
)
from airflow_provider_fal.core.watch import CancelNow, Fail, FetchResult, RequestWatch
from airflow_provider_fal.exceptions import (
    FalClientError,
    FalConfigurationError,
    FalConnectError,
    FalError,
    FalRequestLostError,
)

DEFAULT_RUN_URL = "https://fal.run"
DEFAULT_QUEUE_URL = "https://queue.fal.run"
DEFAULT_CONNECT_TIMEOUT = 10.0
#: fal's own client has no read timeout, so a stuck call hangs a worker forever. Ours waits
#: 10 minutes for an answer (plus the start timeout, when one is given): long enough for a
#: synchronous image or short video, finite for everything else. Use the queue for longer.
DEFAULT_READ_TIMEOUT = 600.0
#: A non-billable probe: the queue status of a request that cannot exist. fal answers 401/403
#: to a bad key and 404 to a good one; no model runs.
CREDENTIAL_PROBE_MODEL = "fal-ai/fast-sdxl"
CREDENTIAL_PROBE_REQUEST_ID = "00000000-0000-0000-0000-000000000000"
#: Read timeout of one queue call (submit, status, result, cancel): fal answers them at once.
QUEUE_CALL_TIMEOUT = 60.0
#: Seconds between two status polls of a queued request, and the default bound on waiting.
DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_WAIT_TIMEOUT = 3600.0
#: The UI's Test button should answer within seconds, not wait out a long backoff.
PROBE_RETRY_POLICY = RetryPolicy(max_attempts=2, initial_backoff=0.5, max_backoff=1.0, max_total_wait=2.0)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FalResponse:
    """A successful answer: the model's JSON output and fal's request id."""

    output: Any
    request_id: str | None
    status_code: int = 200
    headers: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class RunRequest:
    """A model call whose every input has been validated and coerced; nothing sent yet."""

    model_id: str
    arguments: dict[str, Any]
    headers: dict[str, str]
    start_timeout: float | None


def prepare_run(
    model_id: Any,
    arguments: Any = None,
    *,
    start_timeout: Any = None,
    object_lifecycle: Any = None,
    hint: Any = None,
    priority: Any = None,
    headers: Any = None,
) -> RunRequest:
    """Validate and coerce a model call; raises :class:`FalConfigurationError` naming the field."""
    return RunRequest(
        model_id=validate_model_id(model_id),
        arguments=coerce_arguments(arguments),
        headers=build_platform_headers(
            start_timeout=start_timeout,
            object_lifecycle=object_lifecycle,
            hint=hint,
            priority=priority,
            headers=headers,
        ),
        start_timeout=coerce_start_timeout(start_timeout),
    )


def decode_answer(
    status_code: int, headers: Mapping[str, str], content: bytes, *, secret: str | None = None
) -> FalResponse:
    """An HTTP answer from fal as a :class:`FalResponse`, or the typed :class:`FalError` it stands for.

    Shared by the requests-based client and the httpx-based trigger (both pass case-insensitive
    header mappings).
    """
    error = error_from_response(status_code, headers, content, secret=secret)
    if error is not None:
        raise error
    request_id = headers.get(REQUEST_ID_HEADER)
    try:
        output = json.loads(content) if content else None
    except ValueError:
        raise FalError(
            f"fal answered {status_code} with a body that is not JSON", status_code=status_code, request_id=request_id
        ) from None
    return FalResponse(output, request_id, status_code, dict(headers))


def build_platform_headers(
    *,
    start_timeout: Any = None,
    object_lifecycle: Any = None,
    hint: Any = None,
    priority: Any = None,
    headers: Any = None,
) -> dict[str, str]:
    """fal's ``X-Fal-*`` request headers from validated, coerced values."""
    result = coerce_extra_headers(headers)
    timeout = coerce_start_timeout(start_timeout)
    if timeout is not None:
        result["X-Fal-Request-Timeout"] = f"{timeout:g}"
    lifecycle = coerce_object_lifecycle(object_lifecycle)
    if lifecycle is not None:
        result["X-Fal-Object-Lifecycle-Preference"] = _compact_json(lifecycle)
    runner_hint = coerce_hint(hint)
    if runner_hint is not None:
        result["X-Fal-Runner-Hint"] = runner_hint
    queue_priority = coerce_priority(priority)
    if queue_priority is not None:
        result["X-Fal-Queue-Priority"] = queue_priority
    return result


def base_headers(api_key: str) -> dict[str, str]:
    """Headers of every call to fal: the key, our user agent, JSON. Shared with the async trigger."""
    return {
        "Authorization": f"Key {api_key}",
        "User-Agent": f"airflow-provider-fal/{__version__}",
        "Accept": "application/json",
    }


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _failed_before_send(error: requests.exceptions.ConnectionError) -> bool:
    """Whether a connection error happened before any byte of the request left (safe to resend)."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (NewConnectionError, ConnectTimeoutError, NameResolutionError)):
            return True
        pending.extend([getattr(current, "reason", None), current.__cause__, current.__context__])
        pending.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))
    return False


class _KeyAuth(requests.auth.AuthBase):
    """``Authorization: Key <key>`` as the session's ``auth``.

    With no ``auth`` set, requests looks up ``~/.netrc`` (or ``$NETRC``) on every call and, when
    an entry matches (a ``default`` entry matches every host), replaces the fal key with Basic
    credentials: fal then answers 401. Setting ``auth`` skips that lookup, so the key always wins.
    """

    def __init__(self, api_key: str) -> None:
        self._header = f"Key {api_key}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._header
        return request

    def __repr__(self) -> str:
        return "_KeyAuth(***)"


class _Session(requests.Session):
    """A ``requests.Session`` that reads proxy and CA settings from the environment once per host.

    ``requests`` re-reads them on every call, scanning ``os.environ`` several times: about
    0.2 ms per call, more than the rest of this client's own per-call work together (see
    bench/hook_overhead.py). httpx reads them once per client; this reads them on the first
    call to each scheme and host, so ``HTTPS_PROXY``/``NO_PROXY``/``REQUESTS_CA_BUNDLE`` still
    apply, as they were when the session first reached that host.
    """

    def __init__(self) -> None:
        super().__init__()
        self._environment: dict[tuple[str, str], dict[str, Any]] = {}

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict[str, Any]:
        if proxies or stream is not None or verify is not None or cert is not None:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        settings = self._environment.get(key)
        if settings is None:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            self._environment[key] = settings
        return {**settings, "proxies": dict(settings["proxies"])}


def pooled_session(pool_maxsize: int, headers: Mapping[str, str]) -> requests.Session:
    """A session with a pool of ``pool_maxsize`` connections per host and no urllib3-level
    retries (what is retried is decided by :mod:`retry`), environment settings read once per host."""
    session = _Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers.update(headers)
    return session


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
        logger: logging.Logger | None = None,
    ) -> None:
        if not api_key or not isinstance(api_key, str):
            raise FalConfigurationError("A fal API key is required (the fal connection's 'API Key').")
        self._api_key = api_key
        self.run_url = validate_base_url(run_url, "run_url (connection host)")
        self.queue_url = validate_base_url(queue_url, "queue_url (connection extra)")
        self.retry_policy = RetryPolicy.from_value(retry_policy)
        self.timeout = optional_seconds(timeout, "timeout")
        self.connect_timeout = optional_seconds(connect_timeout, "connect_timeout") or DEFAULT_CONNECT_TIMEOUT
        self.pool_maxsize = max(1, int(pool_maxsize))
        self.log = logger or log
        self._session: requests.Session | None = None

    def __repr__(self) -> str:
        return f"FalClient(run_url={self.run_url!r}, queue_url={self.queue_url!r})"

    @property
    def session(self) -> requests.Session:
        """The one HTTP session of this client, created on first use."""
        if self._session is None:
            session = pooled_session(self.pool_maxsize, base_headers(self._api_key))
            session.auth = _KeyAuth(self._api_key)
            self._session = session
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def run_endpoint(self, model_id: str) -> str:
        return f"{self.run_url}/{validate_model_id(model_id)}"

    def read_timeout(self, timeout: Any = None, start_timeout: float | None = None) -> float:
        """The read timeout of one call: explicit, else the client's, else the default + start timeout."""
        explicit = optional_seconds(timeout, "timeout")
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

        All inputs are validated before anything is sent. Retries follow :mod:`retry`.
        """
        prepared = prepare_run(
            model_id,
            arguments,
            start_timeout=start_timeout,
            object_lifecycle=object_lifecycle,
            hint=hint,
            headers=headers,
        )
        return self.request(
            "POST",
            self.run_endpoint(prepared.model_id),
            json_body=prepared.arguments,
            headers=prepared.headers,
            read_timeout=self.read_timeout(timeout, prepared.start_timeout),
        )

    def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
        idempotent: bool = False,
        retry_policy: RetryPolicy | None = None,
    ) -> FalResponse:
        """Send one logical request with retries; return the decoded answer or raise a FalError.

        ``idempotent`` requests (status polls, result fetches) are also retried when their
        answer was lost; a model run never is. ``retry_policy`` overrides the client's.
        """
        what = f"{method} {url}"
        for attempt in retrying(retry_policy or self.retry_policy, self.log, what):
            with attempt:
                return self._send_once(method, url, json_body, headers, read_timeout, idempotent)
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _send_once(
        self,
        method: str,
        url: str,
        json_body: Any,
        headers: dict[str, str] | None,
        read_timeout: float | None,
        idempotent: bool,
    ) -> FalResponse:
        timeout = (self.connect_timeout, read_timeout or self.read_timeout())
        try:
            response = self.session.request(method, url, json=json_body, headers=headers, timeout=timeout)
        except requests.exceptions.ConnectionError as error:
            if _failed_before_send(error):
                raise FalConnectError(f"Could not connect to fal at {url}: {_reason(error)}") from None
            lost = FalRequestLostError(
                f"The request to {url} was sent but no answer arrived ({_reason(error)}). fal may "
                "still bill it; it is not resent automatically."
            )
            lost.retryable = idempotent
            raise lost from None
        except requests.exceptions.Timeout as error:
            lost = FalRequestLostError(
                f"No answer from {url} within the read timeout of {timeout[1]:g} s ({_reason(error)}). "
                "The request was sent and fal may bill it; it is not resent automatically. Raise "
                "`timeout`, or use the queue for long generations."
            )
            lost.retryable = idempotent
            raise lost from None
        except requests.exceptions.RequestException as error:
            raise FalError(f"HTTP request to {url} failed: {_reason(error)}") from None
        return decode_answer(response.status_code, response.headers, response.content, secret=self._api_key)

    def check_credentials(self) -> str:
        """A non-billable probe of the API key; returns a human message or raises FalAuthError."""
        url = f"{self.queue_url}/{CREDENTIAL_PROBE_MODEL}/requests/{CREDENTIAL_PROBE_REQUEST_ID}/status"
        try:
            self.request("GET", url, read_timeout=30.0, idempotent=True, retry_policy=PROBE_RETRY_POLICY)
        except FalError as error:
            if error.status_code in (400, 404, 422):
                return f"fal accepted the API key ({self.queue_url} answered {error.status_code} to a probe)."
            raise
        return f"fal accepted the API key ({self.queue_url})."

    # ------------------------------------------------------------------ queue
    # Each queue method is one logical call on the shared session and keeps no state of its
    # own, so they are safe to call from several threads at once (e.g. a batch of requests).

    def queue_call_timeout(self) -> float:
        """Read timeout of a queue call: the client's ``timeout`` if set, else 60 s."""
        return self.timeout if self.timeout is not None else QUEUE_CALL_TIMEOUT

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

        Inputs are validated exactly as for :meth:`run` before anything is sent; ``priority``
        (``"normal"``/``"low"``) becomes ``X-Fal-Queue-Priority`` and ``webhook_url`` the
        ``fal_webhook`` query parameter. The submit is retried like a synchronous run: only when
        fal says it did not take the request (429, 502/503/504, connection refused), never when
        the answer was lost, so one call never queues (and bills) the same input twice.
        The returned URLs are used only if they point at ``queue_url``.
        """
        prepared = prepare_run(
            model_id,
            arguments,
            start_timeout=start_timeout,
            object_lifecycle=object_lifecycle,
            hint=hint,
            priority=priority,
            headers=headers,
        )
        url = submit_url(self.queue_url, prepared.model_id, coerce_webhook_url(webhook_url))
        response = self.request(
            "POST",
            url,
            json_body=prepared.arguments,
            headers=prepared.headers,
            read_timeout=self.queue_call_timeout(),
        )
        return QueueHandle.from_submit(response.output, queue_url=self.queue_url, model_id=prepared.model_id)

    def status(self, handle: QueueHandle | dict[str, Any], logs: bool = True) -> QueueStatus:
        """``GET`` the request's status (``?logs=1`` with ``logs``). Safe to retry, and retried."""
        handle = coerce_handle(handle, self.queue_url)
        url = handle.status_url + ("?logs=1" if logs else "")
        response = self.request("GET", url, read_timeout=self.queue_call_timeout(), idempotent=True)
        return parse_status(response.output, handle)

    def result(self, handle: QueueHandle | dict[str, Any]) -> FalResponse:
        """``GET`` the output of a COMPLETED request, raising the model's error as a :class:`FalError`.

        fal keeps results 1 hour, only 6 minutes when they are 10 KB or more: fetch promptly.
        """
        handle = coerce_handle(handle, self.queue_url)
        response = self.request("GET", handle.response_url, read_timeout=self.queue_call_timeout(), idempotent=True)
        return FalResponse(
            response.output, response.request_id or handle.request_id, response.status_code, response.headers
        )

    def cancel(self, handle: QueueHandle | dict[str, Any]) -> str:
        """``PUT`` the cancel URL; returns ``CANCELLATION_REQUESTED`` or ``ALREADY_COMPLETED``."""
        handle = coerce_handle(handle, self.queue_url)
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
    ) -> FalResponse:
        """Poll until the request completes and return its result, for at most ``timeout`` seconds.

        ``on_status`` sees every status (e.g. to log new runner lines with
        :class:`~airflow_provider_fal.core.queue.QueueProgress`). A COMPLETED status carrying
        ``error`` raises :class:`FalRequestFailedError`. When ``timeout`` runs out the request
        is cancelled (unless ``cancel_on_timeout=False``) and :class:`FalTimeoutError` raised,
        whose message names the limit as ``timeout_label``; if fal answers that the request
        completed in the meantime, its result is returned instead of being thrown away. What
        to do after each answer is decided by :class:`~airflow_provider_fal.core.watch.RequestWatch`.
        """
        handle = coerce_handle(handle, self.queue_url)
        limit = optional_seconds(timeout, "timeout") or DEFAULT_WAIT_TIMEOUT
        watch = RequestWatch(
            handle,
            poll_interval=optional_seconds(poll_interval, "poll_interval") or DEFAULT_POLL_INTERVAL,
            deadline=time.monotonic() + limit,
            deadline_reason=f"{timeout_label} of {limit:g} s",
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
                return self.result(handle)
            if isinstance(step, Fail):
                raise step.error
            time.sleep(step.seconds)

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
        start_timeout: Any = None,
        object_lifecycle: Any = None,
        hint: Any = None,
        priority: Any = None,
        webhook_url: Any = None,
        headers: Any = None,
        timeout: Any = DEFAULT_WAIT_TIMEOUT,
        poll_interval: Any = DEFAULT_POLL_INTERVAL,
        logs: bool = True,
        on_status: Callable[[QueueStatus], None] | None = None,
    ) -> FalResponse:
        """:meth:`submit` then :meth:`wait`: a queued run that survives dropped connections."""
        handle = self.submit(
            model_id,
            arguments,
            start_timeout=start_timeout,
            object_lifecycle=object_lifecycle,
            hint=hint,
            priority=priority,
            webhook_url=webhook_url,
            headers=headers,
        )
        return self.wait(handle, timeout=timeout, poll_interval=poll_interval, logs=logs, on_status=on_status)


def _reason(error: BaseException) -> str:
    """A short reason: the innermost socket-level message when urllib3 wrapped one."""
    text = str(error) or type(error).__name__
    inner = re.search(r"(\[Errno -?\d+\][^'\")]*|timed out|Connection refused|Connection reset by peer)", text)
    if inner:
        return inner.group(1).strip()
    return text if len(text) <= 300 else text[:300] + "..."
