"""Queue requests whose state is computed lazily from timestamps.

No thread runs per request: a request is ``IN_QUEUE`` until ``start_at``,
``IN_PROGRESS`` until ``end_at`` and ``COMPLETED`` afterwards; both are infinite until the
queue's schedule (:meth:`QueueStore.advance`) starts the request. Its result (status, body) is
computed at submit time and kept until the retention period after completion runs out.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

LARGE_RESULT_BYTES = 10_000
LOG_MESSAGES = ("Loading model", "Step 1/4", "Step 2/4", "Step 3/4", "Step 4/4", "Done")
SWEEP_INTERVAL = 5.0


@dataclass
class QueueRequest:
    """One queued request. Times are ``time.monotonic()`` values; ``wall_offset`` maps them to wall time."""

    request_id: str
    app_id: str
    model_id: str
    queue_url: str
    seq: int
    submitted: float
    ready_at: float  # when a runner could take it (submit + queue wait + runner wait)
    run_time: float
    result_status: int
    result_body: bytes
    output: Any = None
    start_deadline: float | None = None  # submit + start timeout
    start_at: float = math.inf
    end_at: float = math.inf
    result_headers: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    error_type: str | None = None
    aborted: bool = False  # cancelled or timed out: the run did not finish
    webhook_url: str | None = None
    webhook_attempts: int = 0
    webhook_done: bool = False
    wall_offset: float = field(default_factory=lambda: time.time() - time.monotonic())

    # ------------------------------------------------------------------ URLs

    @property
    def base(self) -> str:
        return f"{self.queue_url}/{self.app_id}/requests/{self.request_id}"

    def urls(self) -> dict[str, str]:
        return {
            "response_url": self.base,
            "status_url": f"{self.base}/status",
            "cancel_url": f"{self.base}/cancel",
        }

    # ------------------------------------------------------------------ outcome

    def fail(self, status: int, message: str, error_type: str) -> None:
        """Replace the model's result with fal's error answer."""
        self.error = message
        self.error_type = error_type
        self.output = None
        # a failure bills nothing (fal bills no 5xx and no queue time)
        self.result_headers = [h for h in self.result_headers if h[0].lower() != "x-fal-billable-units"]
        self.result_status = status
        self.result_body = json.dumps({"detail": message, "error_type": error_type}, separators=(",", ":")).encode()

    def time_out(self, at: float) -> None:
        """Its start timeout ran out in the queue: fal drops it with 504 (``X-Fal-Request-Timeout-Type: user``)."""
        self.start_at = self.end_at = at
        self.aborted = True
        self.fail(504, "Request timed out", "request_timeout")
        self.result_headers.append(("X-Fal-Request-Timeout-Type", "user"))

    # ------------------------------------------------------------------ state

    def status(self, now: float) -> str:
        if now >= self.end_at:
            return "COMPLETED"
        if now >= self.start_at:
            return "IN_PROGRESS"
        return "IN_QUEUE"

    def logs(self, now: float) -> list[dict[str, Any]]:
        """The log lines emitted by ``now``: they appear progressively over the run time."""
        if now < self.start_at:
            return []
        run = max(0.0, self.end_at - self.start_at)
        last = len(LOG_MESSAGES) - 1
        entries = []
        for index, message in enumerate(LOG_MESSAGES):
            at = self.start_at + run * index / last
            if self.aborted:
                if at >= self.end_at or at > now:
                    break
            elif at > now or (index == last and now < self.end_at):
                break
            level = "INFO"
            if index == last and self.error is not None:
                message, level = f"Request failed: {self.error}", "ERROR"
            stamp = datetime.fromtimestamp(at + self.wall_offset, tz=timezone.utc)
            entries.append(
                {
                    "message": message,
                    "level": level,
                    "source": "user",
                    "timestamp": stamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
                }
            )
        return entries

    def status_body(self, now: float, *, position: int, with_logs: bool) -> tuple[int, dict[str, Any]]:
        state = self.status(now)
        body: dict[str, Any] = {"status": state, "request_id": self.request_id, **self.urls()}
        if state == "IN_QUEUE":
            body["queue_position"] = position
            return 202, body
        body["logs"] = self.logs(now) if with_logs else None
        if state == "IN_PROGRESS":
            return 202, body
        body["metrics"] = {"inference_time": round(max(0.0, self.end_at - self.start_at), 6)}
        if self.error is not None:
            body["error"] = self.error
            body["error_type"] = self.error_type
        return 200, body


class QueueStore:
    """All queued requests, sharing the emulator's lock, drained at the account's concurrency limit.

    A request becomes ready ``queue_wait`` + ``runner_wait`` after its submit. Ready requests start
    in the order they became ready, as soon as fewer than ``limit()`` queue requests are in
    progress (fal-api.md Concurrency: over the limit a request waits, it is never refused). A
    request that cannot start before its start timeout ends then with 504 ``request_timeout``.
    The schedule is computed lazily: :meth:`advance` plays it forward to "now" whenever a request
    is looked at, so no thread runs per request.
    """

    def __init__(
        self,
        lock: threading.RLock,
        result_retention: float,
        large_result_retention: float,
        limit: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.lock = lock
        self.result_retention = result_retention
        self.large_result_retention = large_result_retention
        self.limit = limit
        self._requests: dict[str, QueueRequest] = {}
        self._waiting: list[QueueRequest] = []  # not started, in the order they become ready
        self._stale_waiting = 0  # of them, cancelled or completed while waiting (dropped when at the head)
        self._running: list[QueueRequest] = []  # started, maybe finished since (pruned as time goes on)
        self._last_start = 0.0
        self._seq = 0
        self._last_sweep = time.monotonic()

    def next_seq(self) -> int:
        with self.lock:
            self._seq += 1
            return self._seq

    def retention(self, request: QueueRequest) -> float:
        if len(request.result_body) >= LARGE_RESULT_BYTES:
            return self.large_result_retention
        return self.result_retention

    def _expired(self, request: QueueRequest, now: float) -> bool:
        return now >= request.end_at + self.retention(request)

    def add(self, request: QueueRequest) -> None:
        """Queue a submitted request (its ``start_at``/``end_at`` are set when it starts)."""
        with self.lock:
            now = time.monotonic()
            self.advance(now)
            self._requests[request.request_id] = request
            bisect.insort(self._waiting, request, key=_queue_order)
            self.advance(now)
            if now - self._last_sweep >= SWEEP_INTERVAL:
                self._sweep(now)

    # ------------------------------------------------------------------ schedule

    def advance(self, now: float) -> None:
        """Start (or time out) every waiting request whose turn came by ``now``."""
        with self.lock:
            limit = self.limit()
            while self._waiting:
                head = self._waiting[0]
                if head.aborted or head.start_at <= now:  # cancelled or completed while waiting
                    self._waiting.pop(0)
                    self._stale_waiting -= 1
                    continue
                start = self._next_start(head, limit)
                deadline = head.start_deadline
                if deadline is not None and start > deadline:
                    if deadline > now:
                        return  # it may still start in time if a slot frees early (a cancel)
                    self._waiting.pop(0)
                    head.time_out(deadline)
                    continue
                if start > now:
                    return
                self._waiting.pop(0)
                head.start_at, head.end_at = start, start + head.run_time
                self._last_start = start
                self._running.append(head)

    def _next_start(self, head: QueueRequest, limit: int | None) -> float:
        """When ``head`` can start: once ready, after the request before it, and when a slot is free."""
        start = max(head.ready_at, self._last_start)
        if limit is None:
            return start
        self._running = [req for req in self._running if req.end_at > start]
        busy = len(self._running)
        if busy < limit:
            return start
        if limit <= 0:
            return math.inf
        ends = sorted(req.end_at for req in self._running)
        return max(start, ends[busy - limit])

    def in_progress(self, now: float) -> int:
        """How many queue requests run at ``now`` (they count against the account's limit)."""
        with self.lock:
            self.advance(now)
            return sum(1 for req in self._running if req.start_at <= now < req.end_at)

    def position(self, request: QueueRequest, now: float) -> int:
        """How many requests are ahead of ``request`` in the queue (0 once it runs)."""
        with self.lock:
            self.advance(now)
            if not self._stale_waiting:  # every request waiting counts: its index (not a scan of 10,000)
                index = bisect.bisect_left(self._waiting, _queue_order(request), key=_queue_order)
                return index if index < len(self._waiting) and self._waiting[index] is request else 0
            ahead = 0
            for waiting in self._waiting:
                if waiting is request:
                    return ahead
                if not waiting.aborted:
                    ahead += 1
            return 0

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        for request_id in [rid for rid, req in self._requests.items() if self._expired(req, now)]:
            del self._requests[request_id]

    def get(self, app_id: str, request_id: str) -> QueueRequest | None:
        """The request, or None when unknown, of another app, or past its retention."""
        with self.lock:
            now = time.monotonic()
            self.advance(now)
            request = self._requests.get(request_id)
            if request is None or request.app_id != app_id:
                return None
            if self._expired(request, now):
                del self._requests[request_id]
                return None
            return request

    def complete_now(self, request: QueueRequest) -> None:
        """Let a request that has not completed yet complete at once, with its result."""
        with self.lock:
            now = time.monotonic()
            self.advance(now)
            if now < request.end_at:
                self._stale_waiting += request.start_at == math.inf  # it was waiting: stays listed until at the head
                request.start_at = min(request.start_at, now)
                request.end_at = now

    def cancel(self, request: QueueRequest, *, stop_running: bool = True) -> bool:
        """Cancel a request that has not completed; False when it already has.

        A queued request is always dropped. A running one only gets the signal: it stops when the
        app honours it (``stop_running``), else it runs on and completes (and is billed) as usual.
        """
        with self.lock:
            now = time.monotonic()
            self.advance(now)
            if now >= request.end_at:
                return False
            if not stop_running and now >= request.start_at:
                return True
            self._stale_waiting += request.start_at == math.inf  # it was waiting: stays listed until at the head
            request.start_at = min(request.start_at, now)
            request.end_at = now
            request.aborted = True
            request.fail(499, "Request cancelled", "client_cancelled")
            self.advance(now)  # a freed slot lets the next request start
            return True

    def all(self) -> list[QueueRequest]:
        with self.lock:
            self.advance(time.monotonic())
            return list(self._requests.values())

    def clear(self) -> None:
        with self.lock:
            self._requests.clear()
            self._waiting.clear()
            self._stale_waiting = 0
            self._running.clear()
            self._last_start = 0.0


def _queue_order(request: QueueRequest) -> tuple[float, int]:
    """The waiting list's order: when a request becomes ready, then when it was submitted."""
    return (request.ready_at, request.seq)
