"""FalEmulator: the Python API of the offline fal gateway."""

from __future__ import annotations

import threading
import time
from typing import Any

from . import gateway
from .cdn import add_upload_fault
from .control import handle_control
from .host import CONTROL_PREFIX
from .listener import Listener
from .messages import Request, Response
from .queue import QueueStore
from .server import logger, make_record, redact
from .signing import DEFAULT_USER_ID, JWKS_PATH, WebhookSigner
from .state import (
    DEFAULT_LOCK_REASON,
    ERROR_STATUS,
    UNSET,
    EmulatorState,
    Fault,
    QueueFailure,
    RequestRecord,
    WebhookRecord,
    new_file_entry,
    non_negative,
    times_or_none,
)
from .webhooks import WebhookDispatcher

FILE_FAULT_MODES = (None, "truncate", "slow")


class FalEmulator:
    """An in-process stand-in for fal's gateway (sync runs, queue, files) on 127.0.0.1.

    ``emu.url`` is the base URL for synchronous runs (like ``https://fal.run``) and
    ``emu.queue_url`` the queue base URL (like ``https://queue.fal.run``). All
    methods are thread-safe. The API key never appears in logs, records, error
    bodies or ``repr``. Webhooks are signed as fal signs them, by a key pair made per instance
    (``webhook_key_seed``: 32 bytes to fix it) whose JWKS is at ``emu.jwks_url``. Its HTTP
    control API (``/_emulator/``) answers to the key or to ``control_token``, never to anonymous
    callers (see :mod:`.control`).
    """

    def __init__(
        self,
        api_key: str = "test-key",
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        runner_wait: float = 0.0,
        queue_wait: float = 0.0,
        run_time: float | None = None,
        default_file_lifespan: float | None = None,
        result_retention: float = 3600.0,
        large_result_retention: float = 360.0,
        log_requests: bool = False,
        webhook_user_id: str = DEFAULT_USER_ID,
        webhook_key_seed: bytes | None = None,
        control_token: str | None = None,
    ) -> None:
        if not isinstance(api_key, str) or not api_key:
            raise ValueError("api_key must be a non-empty string")
        if control_token is not None and (not isinstance(control_token, str) or not control_token):
            raise ValueError("control_token must be a non-empty string or None")
        self._api_key = api_key
        self._control_token = control_token
        self.host = host
        self._requested_port = port
        self.default_file_lifespan = non_negative(default_file_lifespan, "default_file_lifespan", allow_none=True)
        self.log_requests = log_requests
        self.state = EmulatorState(
            latency=non_negative(latency, "latency") or 0.0,
            runner_wait=non_negative(runner_wait, "runner_wait") or 0.0,
            queue_wait=non_negative(queue_wait, "queue_wait") or 0.0,
            run_time=non_negative(run_time, "run_time", allow_none=True),
            default_file_lifespan=self.default_file_lifespan,
        )
        self.queue = QueueStore(
            self.state.lock,
            non_negative(result_retention, "result_retention") or 0.0,
            non_negative(large_result_retention, "large_result_retention") or 0.0,
            limit=lambda: self.state.concurrency_limit,
        )
        self.signer = WebhookSigner(webhook_key_seed, webhook_user_id)
        self.dispatcher = WebhookDispatcher(self.state, self.signer, self.queue.advance)
        self._listener: Listener | None = None
        self._stopping = threading.Event()
        self._url: str | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def api_key(self) -> str:
        """The key clients must send as ``Authorization: Key <api_key>``."""
        return self._api_key

    @property
    def control_token(self) -> str | None:
        """An extra secret the HTTP control API accepts (``X-Emulator-Control-Token``) besides the key."""
        return self._control_token

    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the emulator is not running; call start() first")
        return self._listener.port

    @property
    def url(self) -> str:
        """Base URL for synchronous runs, e.g. ``http://127.0.0.1:8765``."""
        if self._url is None:
            raise RuntimeError("the emulator is not running; call start() first")
        return self._url

    @property
    def queue_url(self) -> str:
        """Base URL of the queue API (same server, ``/queue`` prefix)."""
        return f"{self.url}/queue"

    @property
    def jwks_url(self) -> str:
        """The JWKS of webhook signatures, served without auth (fal: ``rest.alpha.fal.ai/.well-known/jwks.json``)."""
        return f"{self.url}{JWKS_PATH}"

    def webhook_jwks(self) -> dict[str, Any]:
        """The JWKS served at :attr:`jwks_url` (one OKP/Ed25519 key); ``emu.signer.user_id`` is the signed user id."""
        return self.signer.jwks()

    def start(self) -> FalEmulator:
        """Bind and serve in a daemon thread. Returns ``self``."""
        if self._listener is not None:
            return self
        self._stopping.clear()
        self._listener = Listener(self, self.host, self._requested_port)
        url_host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in url_host:
            url_host = f"[{url_host}]"
        self._url = f"http://{url_host}:{self._listener.port}"
        self.dispatcher.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and the webhook thread."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        listener.close()
        self.dispatcher.stop()

    def refuse_connections(self, seconds: float) -> None:
        """An outage: from 0.2 s after this call, the port refuses connections for ``seconds``.

        Open connections are shut too; then the emulator listens again on the same port. Queued
        and running requests, files and records are kept, and requests keep running meanwhile.
        """
        duration = non_negative(seconds, "seconds") or 0.0
        if self._listener is None:
            raise RuntimeError("the emulator is not running; call start() first")
        self._listener.outage(duration)

    def __enter__(self) -> FalEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FalEmulator(url={self._url!r})"

    def respond(self, request: Request) -> Response:
        """The answer to one HTTP request: the control API under ``/_emulator/``, else fal's gateway."""
        if request.path.startswith(CONTROL_PREFIX):
            return handle_control(self, request)
        return gateway.handle(self, request)

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the emulator stops first; True when it is stopping."""
        if seconds <= 0:
            return self._stopping.is_set()
        return self._stopping.wait(seconds)

    # ------------------------------------------------------------------ timings

    def set_latency(self, seconds: float, model_id: str | None = None) -> None:
        """Model run time of sync requests (and the default queue run time). ``model_id=None``: all models."""
        value = non_negative(seconds, "seconds")
        with self.state.lock:
            self.state.latency.set(value, model_id)

    def set_runner_wait(self, seconds: float, model_id: str | None = None) -> None:
        """Time before a runner starts a request; a start timeout shorter than this gives 504."""
        value = non_negative(seconds, "seconds")
        with self.state.lock:
            self.state.runner_wait.set(value, model_id)

    def set_queue_timing(
        self, queue_wait: float | None = UNSET, run_time: float | None = UNSET, model_id: str | None = None
    ) -> None:
        """Queue requests stay IN_QUEUE for ``queue_wait`` (+ runner wait) then IN_PROGRESS for ``run_time``.

        Arguments left out keep their value; ``run_time=None`` means "the model's latency".
        """
        with self.state.lock:
            if queue_wait is not UNSET:
                self.state.queue_wait.set(non_negative(queue_wait, "queue_wait"), model_id)
            if run_time is not UNSET:
                self.state.run_time.set(non_negative(run_time, "run_time", allow_none=True), model_id)

    def set_concurrency_limit(self, limit: int | None = None) -> None:
        """The account's concurrency limit: how many requests may be in progress at once (None: no limit).

        As on fal (fal-api.md Concurrency), queue requests over the limit wait ``IN_QUEUE`` (with
        their ``queue_position``) until a queue request in progress ends; a sync run over the limit
        (counting queue requests in progress) gets 429 ``concurrent_requests_limit``.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError("limit must be a non-negative integer or None")
        with self.state.lock:
            self.queue.advance(time.monotonic())  # what ran so far ran under the old limit
            self.state.concurrency_limit = limit

    # ------------------------------------------------------------------ faults

    def inject_fault(
        self,
        status: int = 503,
        error_type: str | None = "runner_disconnected",
        detail: Any = None,
        times: int | None = 1,
        model_id: str | None = None,
        headers: dict[str, str] | None = None,
        html: bool = False,
        drop_connection: bool = False,
        needs_retry: bool = False,
        retryable: bool | None = None,
        retry_after: float | int | str | None = None,
        timeout_type: str | None = None,
    ) -> None:
        """The next ``times`` API requests under ``model_id`` (None: any) get this answer instead.

        Applies to sync runs, queue submits and queue status/result/cancel calls
        (matched on the path after ``/queue/``), not to file downloads.
        """
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        fault = Fault(
            status=status,
            error_type=error_type,
            detail=detail,
            remaining=times_or_none(times),
            model_id=model_id,
            headers={str(k): str(v) for k, v in (headers or {}).items()},
            html=bool(html),
            drop_connection=bool(drop_connection),
            needs_retry=bool(needs_retry),
            retryable=retryable,
            retry_after=retry_after,
            timeout_type=timeout_type,
        )
        with self.state.lock:
            self.state.faults.append(fault)

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()
            self.state.queue_failures.clear()

    def lock_account(self, reason: str = DEFAULT_LOCK_REASON) -> None:
        """Every authenticated request gets 403 ``{"detail": "User is locked. Reason: <reason>"}``."""
        with self.state.lock:
            self.state.lock_reason = str(reason)

    def unlock_account(self) -> None:
        with self.state.lock:
            self.state.lock_reason = None

    def fail_queued(
        self,
        model_id: str | None = None,
        error: str = "Internal server error",
        error_type: str = "runner_server_error",
        times: int | None = 1,
        status: int | None = None,
    ) -> None:
        """The next ``times`` queue submits under ``model_id`` complete with ``error``.

        Their status becomes COMPLETED with ``error``/``error_type``; the result
        answers ``status`` (default: the usual status of ``error_type``, else 500).
        """
        code = status if status is not None else ERROR_STATUS.get(error_type, 500)
        failure = QueueFailure(str(error), str(error_type), int(code), times_or_none(times), model_id)
        with self.state.lock:
            self.state.queue_failures.append(failure)

    def complete_on_cancel(self, enabled: bool = True, model_id: str | None = None) -> None:
        """Cancels of queue requests under ``model_id`` find them completing just then.

        A request that has not completed yet completes at once, with its result, and the cancel
        answers ``ALREADY_COMPLETED`` (400), as when a job finishes right as the cancel arrives,
        although its last status still said ``IN_PROGRESS``. Until reset or ``enabled=False``.
        """
        if not isinstance(enabled, bool):
            raise ValueError("enabled must be true or false")
        with self.state.lock:
            self.state.cancel_completes.set(enabled, model_id)

    def set_cancel_honoured(self, honoured: bool = True, model_id: str | None = None) -> None:
        """Whether a running request under ``model_id`` stops when cancelled (default: it does).

        fal drops a queued request on cancel, but a running one only gets a signal; an app that
        does not handle it runs on and completes, and the cancel still answers CANCELLATION_REQUESTED.
        """
        if not isinstance(honoured, bool):
            raise ValueError("honoured must be true or false")
        with self.state.lock:
            self.state.cancel_honoured.set(honoured, model_id)

    def set_file_fault(self, mode: str | None = None, bytes_per_second: float | None = None) -> None:
        """File downloads: ``truncate`` (half the bytes, then close), ``slow`` (throttled), None."""
        if mode not in FILE_FAULT_MODES:
            raise ValueError(f"mode must be one of {FILE_FAULT_MODES}")
        rate = non_negative(bytes_per_second, "bytes_per_second", allow_none=True)
        if rate == 0:
            raise ValueError("bytes_per_second must be positive")
        with self.state.lock:
            self.state.file_fault = mode
            self.state.file_fault_rate = rate

    def fail_upload(self, step: str, part: int | None = None, times: int | None = 1, status: int = 500) -> None:
        """CDN uploads: ``step`` (token/upload/create/part/complete; ``part`` N or all) answers ``status``."""
        add_upload_fault(self, step, part, times_or_none(times), status)

    # ------------------------------------------------------------------ files

    def add_file(
        self,
        data: bytes | None = None,
        *,
        size: int | None = None,
        content_type: str = "application/octet-stream",
        lifespan: float | None = None,
        name: str | None = None,
    ) -> str:
        """Serve ``data`` (or ``size`` deterministic bytes, streamed) and return its URL.

        ``lifespan`` None means the default file lifespan (itself None: never expires).
        """
        entry = new_file_entry(data, size, content_type, name)
        if lifespan is None:
            lifespan = self.default_file_lifespan
        self.state.add_file(entry, non_negative(lifespan, "lifespan", allow_none=True))
        return f"{self.url}/files/{entry.file_id}/{entry.name}"

    # ------------------------------------------------------------------ records

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request answered (control API excluded), oldest first."""
        with self.state.lock:
            return list(self.state.records)

    @property
    def webhooks(self) -> list[WebhookRecord]:
        """Every webhook delivered, failed or ignored."""
        with self.state.lock:
            return list(self.state.webhooks)

    def count(self, method: str | None = None, path_prefix: str | None = None) -> int:
        """How many recorded requests match ``method`` and start with ``path_prefix``."""
        return sum(
            1
            for record in self.requests
            if (method is None or record.method == method.upper())
            and (path_prefix is None or record.path.startswith(path_prefix))
        )

    def reset(self) -> None:
        """Back to the constructor settings: no faults, records, limits, files, queued requests or lock."""
        with self.state.lock:
            self.state.reset()
            self.queue.clear()
            self.dispatcher.clear()

    def _finished(self, request: Any, status: int | None, started: float, duration: float) -> None:
        """Called by the HTTP handler once a request is answered."""
        self.state.record(make_record(request, status, started, duration, self._api_key))
        if self.log_requests:
            path = redact(request.path, self._api_key)
            logger.info("%s %s %s %.3fs", request.method, path, status if status is not None else "-", duration)
