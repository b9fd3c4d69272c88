"""Webhook delivery from one background timer thread.

fal POSTs ``{"request_id", "gateway_request_id", "status": "OK"|"ERROR", "payload", "error"}``
to the ``fal_webhook`` URL when a queued request completes, signed as fal signs it
(:mod:`.signing`: ``X-Fal-Webhook-*`` headers, an Ed25519 signature checked against the
emulator's JWKS at ``/.well-known/jwks.json``; each attempt is signed afresh with its own
timestamp). The emulator only delivers to 127.0.0.1/localhost (anything else is recorded as
ignored).
"""

from __future__ import annotations

import heapq
import http.client
import json
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from .queue import QueueRequest
from .signing import WebhookSigner
from .state import EmulatorState, WebhookRecord

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_ATTEMPTS = 3
RETRY_DELAY = 0.5
DELIVERY_TIMEOUT = 5.0
PENDING_RECHECK = 0.25  # a request still waiting for a slot has no end time yet: look again this often


def is_local_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme == "http" and (parts.hostname or "") in LOCAL_HOSTS
    except ValueError:
        return False


def webhook_body(request: QueueRequest) -> dict[str, object]:
    """fal's webhook: on ERROR, ``payload`` is the model's error body, ``error`` names its status."""
    ok = request.error is None and request.result_status < 400
    if ok:
        payload, error = request.output, None
    else:
        try:
            payload = json.loads(request.result_body)
        except ValueError:
            payload = None
        error = f"Invalid status code: {request.result_status}"
    return {
        "request_id": request.request_id,
        "gateway_request_id": request.request_id,
        "status": "OK" if ok else "ERROR",
        "payload": payload,
        "error": error,
    }


class WebhookDispatcher:
    """A heap of (due time, request) served by a single daemon thread."""

    def __init__(
        self, state: EmulatorState, signer: WebhookSigner, advance: Callable[[float], None] = lambda now: None
    ) -> None:
        self.state = state
        self.signer = signer
        self._advance = advance  # plays the queue's schedule forward to a time
        self._cond = threading.Condition(state.lock)
        self._heap: list[tuple[float, int, QueueRequest]] = []
        self._counter = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fal-emulator-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=DELIVERY_TIMEOUT + 1)
            self._thread = None

    def schedule(self, request: QueueRequest, due: float) -> None:
        """(Re)schedule delivery for ``request`` at monotonic time ``due``."""
        with self._cond:
            self._counter += 1
            due = min(due, time.monotonic() + PENDING_RECHECK)
            heapq.heappush(self._heap, (due, self._counter, request))
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._heap.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                if not self._heap:
                    self._cond.wait()
                    continue
                due, _, request = self._heap[0]
                if due > now:
                    self._cond.wait(timeout=due - now)
                    continue
                heapq.heappop(self._heap)
                if request.webhook_done or request.webhook_url is None:
                    continue
                self._advance(now)
                if request.end_at > now:  # not complete yet (still queued, or timings changed): come back later
                    self._counter += 1
                    heapq.heappush(self._heap, (min(request.end_at, now + PENDING_RECHECK), self._counter, request))
                    continue
                request.webhook_attempts += 1
                attempts = request.webhook_attempts
                url = request.webhook_url
                body = webhook_body(request)
            self._deliver(request, url, body, attempts)

    def _deliver(self, request: QueueRequest, url: str, body: dict[str, object], attempts: int) -> None:
        status: int | None = None
        error: str | None = None
        headers: dict[str, str] | None = None
        if not is_local_url(url):
            error = "ignored: the emulator only delivers webhooks to http://127.0.0.1 or http://localhost"
        else:
            parts = urlsplit(url)
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            data = json.dumps(body, separators=(",", ":")).encode()
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "fal-emulator-webhook",
                **self.signer.headers(request.request_id, data),
            }
            try:
                conn = http.client.HTTPConnection(
                    parts.hostname or "127.0.0.1", parts.port or 80, timeout=DELIVERY_TIMEOUT
                )
                try:
                    conn.request("POST", target, body=data, headers=headers)
                    response = conn.getresponse()
                    response.read()
                    status = response.status
                finally:
                    conn.close()
                if status >= 300:
                    error = f"receiver answered {status}"
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
        delivered = error is None
        retry = not delivered and is_local_url(url) and attempts < MAX_ATTEMPTS
        with self._cond:
            if not retry:
                request.webhook_done = True
            self.state.record_webhook(
                WebhookRecord(
                    url=url,
                    request_id=request.request_id,
                    status=str(body["status"]),
                    delivered=delivered,
                    response_status=status,
                    error=error,
                    attempts=attempts,
                    body=body,
                    headers=headers,
                )
            )
        if retry:
            self.schedule(request, time.monotonic() + RETRY_DELAY * attempts)
