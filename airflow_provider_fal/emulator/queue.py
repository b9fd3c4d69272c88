"""Queue requests whose state is computed lazily from timestamps.

No thread runs per request: a request is ``IN_QUEUE`` until ``start_at``,
``IN_PROGRESS`` until ``end_at`` and ``COMPLETED`` afterwards. Its result (status,
body) is computed at submit time and kept until the retention period after
completion runs out.
"""

from __future__ import annotations

import json
import threading
import time
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
    start_at: float
    end_at: float
    result_status: int
    result_body: bytes
    output: Any = None
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
    """All queued requests, sharing the emulator's lock."""

    def __init__(self, lock: threading.RLock, result_retention: float, large_result_retention: float) -> None:
        self.lock = lock
        self.result_retention = result_retention
        self.large_result_retention = large_result_retention
        self._requests: dict[str, QueueRequest] = {}
        self._pending: list[QueueRequest] = []  # not started yet, in submission order (by seq)
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
        with self.lock:
            self._requests[request.request_id] = request
            if request.start_at > request.submitted:
                self._pending.append(request)
            now = time.monotonic()
            if now - self._last_sweep >= SWEEP_INTERVAL:
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        for request_id in [rid for rid, req in self._requests.items() if self._expired(req, now)]:
            del self._requests[request_id]
        self._pending = [req for req in self._pending if req.start_at > now]

    def get(self, app_id: str, request_id: str) -> QueueRequest | None:
        """The request, or None when unknown, of another app, or past its retention."""
        with self.lock:
            request = self._requests.get(request_id)
            if request is None or request.app_id != app_id:
                return None
            if self._expired(request, time.monotonic()):
                del self._requests[request_id]
                return None
            return request

    def position(self, request: QueueRequest, now: float) -> int:
        """How many earlier requests are still waiting in the queue."""
        with self.lock:
            while self._pending and self._pending[0].start_at <= now:
                self._pending.pop(0)
            return sum(1 for req in self._pending if req.seq < request.seq and req.start_at > now)

    def complete_now(self, request: QueueRequest) -> None:
        """Let a request that has not completed yet complete at once, with its result."""
        with self.lock:
            now = time.monotonic()
            if now < request.end_at:
                request.start_at = min(request.start_at, now)
                request.end_at = now

    def cancel(self, request: QueueRequest, *, stop_running: bool = True) -> bool:
        """Cancel a request that has not completed; False when it already has.

        A queued request is always dropped. A running one only gets the signal: it stops when the
        app honours it (``stop_running``), else it runs on and completes (and is billed) as usual.
        """
        with self.lock:
            now = time.monotonic()
            if now >= request.end_at:
                return False
            if not stop_running and now >= request.start_at:
                return True
            request.start_at = min(request.start_at, now)
            request.end_at = now
            request.aborted = True
            request.error = "Request cancelled"
            request.error_type = "client_cancelled"
            request.output = None
            request.result_status = 499
            request.result_body = json.dumps(
                {"detail": request.error, "error_type": request.error_type}, separators=(",", ":")
            ).encode()
            return True

    def all(self) -> list[QueueRequest]:
        with self.lock:
            return list(self._requests.values())

    def clear(self) -> None:
        with self.lock:
            self._requests.clear()
            self._pending.clear()
