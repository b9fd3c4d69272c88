"""Mutable emulator state: settings, faults, served files and request records.

All of it is guarded by one lock owned by :class:`EmulatorState`; the queue store
and the webhook dispatcher share that same lock.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from . import models
from .png import render_png

_FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

CHUNK_SIZE = 64 * 1024
MAX_RECORDS = 100_000

#: status used when an error type is given without one
ERROR_STATUS: dict[str, int] = {
    "request_timeout": 504,
    "startup_timeout": 504,
    "runner_scheduling_failure": 503,
    "runner_connection_timeout": 503,
    "runner_disconnected": 503,
    "runner_connection_refused": 503,
    "runner_connection_error": 503,
    "runner_incomplete_response": 502,
    "runner_server_error": 500,
    "internal_error": 500,
    "client_disconnected": 499,
    "client_cancelled": 499,
    "bad_request": 400,
    "concurrent_requests_limit": 429,
    "rate_limited": 429,
}

DEFAULT_DETAIL: dict[str, str] = {
    "request_timeout": "Request timed out",
    "startup_timeout": "Runner startup timed out",
    "runner_scheduling_failure": "Could not schedule a runner for the request",
    "runner_connection_timeout": "Timed out connecting to the runner",
    "runner_disconnected": "Runner disconnected",
    "runner_connection_refused": "Runner refused the connection",
    "runner_connection_error": "Error connecting to the runner",
    "runner_incomplete_response": "Runner returned an incomplete response",
    "runner_server_error": "Runner server error",
    "internal_error": "Internal server error",
    "client_disconnected": "Client disconnected",
    "client_cancelled": "Request cancelled",
    "bad_request": "Bad request",
    "concurrent_requests_limit": "Concurrent requests limit exceeded",
    "rate_limited": "Concurrent requests limit exceeded",
}

DEFAULT_LOCK_REASON = "Exhausted balance. Top up your balance at fal.ai/dashboard/billing."

UNSET: Any = object()


def non_negative(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    """Validate a number of seconds (or a count) given through the Python or HTTP API."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    return float(value)


def times_or_none(times: Any) -> int | None:
    """Validate how many times a fault applies (None: until reset)."""
    if times is None:
        return None
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError("times must be a positive integer or None (until reset)")
    return times


def path_matches(path: str, model_id: str | None) -> bool:
    """Whether a model path (no leading slash, no ``queue/``) falls under ``model_id``."""
    if model_id is None:
        return True
    model_id = model_id.strip("/")
    return path == model_id or path.startswith(model_id + "/")


@dataclass
class Fault:
    """A canned answer for the next ``remaining`` matching API requests (None = until reset)."""

    status: int = 503
    error_type: str | None = "runner_disconnected"
    detail: Any = None
    remaining: int | None = 1
    model_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    html: bool = False
    drop_connection: bool = False
    needs_retry: bool = False
    retryable: bool | None = None
    retry_after: float | int | str | None = None
    timeout_type: str | None = None


@dataclass
class QueueFailure:
    """Makes the next ``remaining`` matching queue submits complete with an error."""

    error: str
    error_type: str
    status: int
    remaining: int | None
    model_id: str | None


@dataclass
class FileEntry:
    """A file served under ``/files/<file_id>/<name>``.

    ``kind`` is ``bytes`` (``data`` holds it), ``png`` (rendered lazily from
    width/height/key, then cached in ``data``), ``stream`` (``size`` bytes
    generated chunk by chunk from ``key``) or ``disk`` (``size`` bytes of an upload in the
    anonymous temporary file ``handle``, read with ``os.pread``).
    """

    file_id: str
    name: str
    content_type: str
    kind: str
    data: bytes | None = None
    size: int | None = None
    width: int = 0
    height: int = 0
    key: bytes = b""
    expires_at: float | None = None  # time.monotonic() deadline
    handle: Any = field(default=None, repr=False)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def content_length(self) -> int:
        if self.kind in ("stream", "disk"):
            return int(self.size or 0)
        return len(self.body())

    def body(self) -> bytes:
        """The whole content (``bytes``/``png`` kinds); PNGs are rendered on first use and cached."""
        if self.data is None and self.kind == "png":
            self.data = render_png(self.width, self.height, self.key)
        return self.data or b""

    def chunks(self) -> Iterator[bytes]:
        """The content in chunks of at most 64 KiB; never holds a whole stream in memory."""
        if self.kind == "disk":
            size = int(self.size or 0)
            for offset in range(0, size, CHUNK_SIZE):
                yield os.pread(self.handle.fileno(), min(CHUNK_SIZE, size - offset), offset)
            return
        if self.kind != "stream":
            data = self.body()
            for offset in range(0, len(data), CHUNK_SIZE):
                yield data[offset : offset + CHUNK_SIZE]
            return
        base = hashlib.shake_256(b"fal-emulator-blob\x00" + self.key).digest(CHUNK_SIZE)
        size = int(self.size or 0)
        for index, offset in enumerate(range(0, size, CHUNK_SIZE)):
            chunk = struct.pack(">Q", index) + base[8:]
            yield chunk[: min(CHUNK_SIZE, size - offset)]


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator answered. ``headers`` never holds ``Authorization``.

    The record is stored just before the answer is written (so a client that has
    its answer always finds it): ``finished`` is when the answer was ready, and
    ``status`` is None when a fault dropped the connection without answering.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    status: int | None  # None when the connection was dropped without an answer
    started: float
    finished: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WebhookRecord:
    """One webhook the emulator delivered, failed to deliver or ignored."""

    url: str
    request_id: str
    status: str
    delivered: bool
    response_status: int | None
    error: str | None
    attempts: int
    body: Any = None
    headers: dict[str, str] | None = None  # sent with this attempt, X-Fal-Webhook-* included; None: not sent

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PerModel:
    """A setting with a default and per-model overrides (looked up by endpoint, model, then app id)."""

    def __init__(self, default: Any) -> None:
        self.default = default
        self.overrides: dict[str, Any] = {}

    def set(self, value: Any, model_id: str | None) -> None:
        if model_id is None:
            self.default = value
            self.overrides.clear()
        else:
            self.overrides[model_id.strip("/")] = value

    def get(self, *keys: str) -> Any:
        for key in keys:
            if key in self.overrides:
                return self.overrides[key]
        return self.default


class EmulatorState:
    """Everything mutable, behind ``self.lock``."""

    def __init__(
        self,
        *,
        latency: float,
        runner_wait: float,
        queue_wait: float,
        run_time: float | None,
        default_file_lifespan: float | None,
    ) -> None:
        self.lock = threading.RLock()
        self._defaults = (latency, runner_wait, queue_wait, run_time)
        self.default_file_lifespan = default_file_lifespan
        self.in_flight = 0
        self.records: list[RequestRecord] = []
        self.webhooks: list[WebhookRecord] = []
        self.files: dict[str, FileEntry] = {}
        self._reset_settings()

    def _reset_settings(self) -> None:
        latency, runner_wait, queue_wait, run_time = self._defaults
        self.latency = PerModel(latency)
        self.runner_wait = PerModel(runner_wait)
        self.queue_wait = PerModel(queue_wait)
        self.run_time = PerModel(run_time)
        self.concurrency_limit: int | None = None
        self.faults: list[Fault] = []
        self.queue_failures: list[QueueFailure] = []
        self.cancel_completes = PerModel(False)  # a cancel finds the request just completed
        self.cancel_honoured = PerModel(True)  # a running request stops on cancel (the app handles it)
        self.lock_reason: str | None = None
        self.file_fault: str | None = None
        self.file_fault_rate: float | None = None
        self.cdn_token_ttl = 3600.0  # seconds a storage token lives (see .cdn)
        self.cdn_tokens: dict[str, float] = {}  # token -> time.monotonic() expiry
        self.uploads: dict[str, Any] = {}  # multipart upload id -> .cdn.Multipart
        self.upload_faults: list[list[Any]] = []  # [step, remaining, status] (see .cdn)

    def reset(self) -> None:
        with self.lock:
            self._reset_settings()
            self.records.clear()
            self.webhooks.clear()
            self.files.clear()

    # ----------------------------------------------------------------- faults

    def take_fault(self, path: str) -> Fault | None:
        """Consume and return the first fault matching ``path``."""
        with self.lock:
            for index, fault in enumerate(self.faults):
                if path_matches(path, fault.model_id):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            del self.faults[index]
                    return fault
        return None

    def take_queue_failure(self, path: str) -> QueueFailure | None:
        with self.lock:
            for index, failure in enumerate(self.queue_failures):
                if path_matches(path, failure.model_id):
                    if failure.remaining is not None:
                        failure.remaining -= 1
                        if failure.remaining <= 0:
                            del self.queue_failures[index]
                    return failure
        return None

    # ----------------------------------------------------------------- concurrency

    def acquire_slot(self, busy_elsewhere: int = 0) -> bool:
        """Take a sync slot unless the account's limit is reached (``busy_elsewhere``: queue requests in progress)."""
        with self.lock:
            if self.concurrency_limit is not None and self.in_flight + busy_elsewhere >= self.concurrency_limit:
                return False
            self.in_flight += 1
            return True

    def release_slot(self) -> None:
        with self.lock:
            self.in_flight -= 1

    # ----------------------------------------------------------------- files

    def add_file(self, entry: FileEntry, lifespan: float | None) -> None:
        """Register (or re-create) a file; ``lifespan`` None means it never expires."""
        if lifespan is not None:
            entry.expires_at = time.monotonic() + lifespan
        with self.lock:
            previous = self.files.get(entry.file_id)
            if previous is not None and previous.kind == "png" and previous.key == entry.key:
                entry.data = previous.data  # keep the rendered bytes of an identical image
            self.files[entry.file_id] = entry

    def get_file(self, file_id: str) -> FileEntry | None:
        with self.lock:
            entry = self.files.get(file_id)
            if entry is not None and entry.expired(time.monotonic()):
                del self.files[file_id]
                return None
            return entry

    # ----------------------------------------------------------------- records

    def record(self, record: RequestRecord) -> None:
        with self.lock:
            self.records.append(record)
            if len(self.records) > MAX_RECORDS:
                del self.records[: len(self.records) - MAX_RECORDS]

    def record_webhook(self, record: WebhookRecord) -> None:
        with self.lock:
            self.webhooks.append(record)
            if len(self.webhooks) > MAX_RECORDS:
                del self.webhooks[: len(self.webhooks) - MAX_RECORDS]


def new_file_entry(data: bytes | None, size: int | None, content_type: str, name: str | None) -> FileEntry:
    """A file to serve: ``data`` as given, or ``size`` deterministic bytes streamed (exactly one of them)."""
    if (data is None) == (size is None):
        raise ValueError("give exactly one of data or size")
    if name is None:
        extension = models.EXTENSIONS.get(content_type.split(";")[0].strip().lower(), "bin")
        name = f"file.{extension}"
    if not _FILE_NAME.match(name) or name in (".", ".."):
        raise ValueError("name must be a plain file name (letters, digits, '.', '-', '_')")
    file_id = uuid.uuid4().hex
    if data is not None:
        return FileEntry(file_id, name, content_type, "bytes", data=bytes(data))
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError("size must be a non-negative integer")
    return FileEntry(file_id, name, content_type, "stream", size=size, key=file_id.encode())
