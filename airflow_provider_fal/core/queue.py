"""fal's queue API, the parts that do not depend on how HTTP is sent.

Shared by the synchronous :class:`~airflow_provider_fal.core.client.FalClient` and the async
trigger so that both build the same URLs, trust the same hosts and read statuses the same way:

* :class:`QueueHandle`: a submitted request (id and the status/response/cancel URLs).
  URLs fal returns are used only when they point at the configured queue host; otherwise
  (and when only a stored request id is known) they are rebuilt from the *app id*, never
  from the endpoint subpath. The API key is never sent anywhere else.
* :class:`QueueStatus` and :func:`parse_status`: a status answer (``IN_QUEUE``,
  ``IN_PROGRESS``, ``COMPLETED``), where a ``COMPLETED`` status carrying ``error`` is a failure.
* :class:`QueueProgress`: which runner log lines and queue positions are new since the
  last poll, so each reaches the task log exactly once.

This module imports nothing from Airflow.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import SplitResult, urlsplit

from airflow_provider_fal.core.classify import error_from_failed_status
from airflow_provider_fal.core.validation import app_id_of, validate_base_url, validate_model_id
from airflow_provider_fal.exceptions import FalConfigurationError, FalError, FalResultExpiredError

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
PENDING_STATES = frozenset({IN_QUEUE, IN_PROGRESS})
CANCELLATION_REQUESTED = "CANCELLATION_REQUESTED"
ALREADY_COMPLETED = "ALREADY_COMPLETED"


def cancel_outcome(body: Any) -> str:
    """What a successful cancel answer reports: fal's ``status``, else ``CANCELLATION_REQUESTED``."""
    return str(body.get("status")) if isinstance(body, dict) and body.get("status") else CANCELLATION_REQUESTED


def is_already_completed(error: FalError) -> bool:
    """Whether a failed cancel only means the request had already completed (400 ALREADY_COMPLETED)."""
    return error.status_code == 400 and ALREADY_COMPLETED in str(error.detail)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOG_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "STDOUT": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "STDERR": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.ERROR,
    "FATAL": logging.ERROR,
}

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- URLs


def validate_request_id(request_id: Any, field: str = "request_id") -> str:
    """A fal request id (a UUID in practice): one safe URL path segment."""
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id) or request_id in (".", ".."):
        raise FalConfigurationError(
            f"{field} must be fal's request id (letters, digits, '-', '_' or '.'), got {request_id!r}."
        )
    return request_id


def request_base_url(queue_url: str, model_id: str, request_id: str) -> str:
    """``{queue_url}/{app_id}/requests/{request_id}``: the result URL, parent of status and cancel."""
    base = validate_base_url(queue_url, "queue_url")
    return f"{base}/{app_id_of(model_id)}/requests/{validate_request_id(request_id)}"


def coerce_webhook_url(value: Any, field: str = "webhook_url") -> str | None:
    """An http(s) URL fal will POST the result to (``?fal_webhook=``), or None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise FalConfigurationError(f"{field} must be an http(s) URL without spaces, got {value!r}.")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FalConfigurationError(
            f"{field} {value!r} is not an http(s) URL; use e.g. 'https://example.com/fal-webhook'."
        )
    return value


#: Any character ``str.isspace`` holds for (``\s`` of a ``str`` pattern is the same set).
_WHITESPACE = re.compile(r"\s")


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


@lru_cache(maxsize=32)
def _base_parts(base: str) -> tuple[tuple[str, str, int | None], str]:
    """The origin and path (no trailing ``/``) of a queue base URL (a few per process: cached)."""
    parts = urlsplit(base)
    return _origin(parts), parts.path.rstrip("/")


def is_under(url: Any, base: str) -> bool:
    """Whether ``url`` is on the same scheme, host and port as ``base`` and below its path.

    Rejects credentials, queries, fragments and ``.``/``..`` segments: an URL accepted here
    cannot carry the API key anywhere but the configured queue host.
    """
    if not isinstance(url, str) or not url or _WHITESPACE.search(url):
        return False
    try:
        parts = urlsplit(url)
        base_origin, base_path = _base_parts(base)
        if _origin(parts) != base_origin:
            return False
    except ValueError:  # e.g. an invalid port
        return False
    if parts.username or parts.password or parts.query or parts.fragment:
        return False
    if not parts.path.startswith(base_path + "/"):
        return False
    return all(segment not in ("", ".", "..") for segment in parts.path[len(base_path) + 1 :].split("/"))


@dataclass(frozen=True)
class QueueHandle:
    """A request submitted to fal's queue; JSON-friendly through :meth:`to_dict`.

    Build one with :meth:`from_submit` (fal's submit answer), :meth:`rebuild` (a stored
    request id) or :meth:`from_dict` (a stored handle, re-checked against the queue URL).
    """

    request_id: str
    model_id: str
    status_url: str
    response_url: str
    cancel_url: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def rebuild(cls, queue_url: str, model_id: str, request_id: str) -> QueueHandle:
        """The handle of a known request id, with URLs built from the app id of ``model_id``."""
        base = request_base_url(queue_url, model_id, request_id)
        return cls(request_id, model_id, f"{base}/status", base, f"{base}/cancel")

    @classmethod
    def from_submit(cls, body: Any, *, queue_url: str, model_id: str) -> QueueHandle:
        """The handle of fal's submit answer; URLs off the configured queue host are rebuilt."""
        if not isinstance(body, Mapping) or not isinstance(body.get("request_id"), str):
            raise FalError(f"fal's queue answered a submit of {model_id} without a request_id: {_short(body)}")
        return cls.from_dict({**body, "model_id": model_id}, queue_url=queue_url)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, queue_url: str) -> QueueHandle:
        """A handle from a dict (XCom, trigger kwargs, task state); each URL is used only if it
        lies under ``queue_url``, otherwise it is rebuilt from the app id."""
        if not isinstance(data, Mapping):
            raise FalConfigurationError(
                f"A fal queue request must be a dict with request_id and model_id, got {data!r}."
            )
        model_id = validate_model_id(data.get("model_id"), "model_id of the queued request")
        request_id = validate_request_id(data.get("request_id"))
        rebuilt = cls.rebuild(queue_url, model_id, request_id)
        base = validate_base_url(queue_url, "queue_url")
        urls = {}
        for name in ("status_url", "response_url", "cancel_url"):
            given = data.get(name)
            if given == getattr(rebuilt, name) or (given and is_under(given, base)):
                urls[name] = given
            else:
                if given:
                    _ignoring_foreign_url(name, given, request_id, base, getattr(rebuilt, name))
                urls[name] = getattr(rebuilt, name)
        return cls(request_id=request_id, model_id=model_id, **urls)


#: (configured queue URL, foreign origin) pairs already warned about in this process
_foreign_origins_warned: set[tuple[str, tuple[str, str, int | None]]] = set()


def _ignoring_foreign_url(name: str, given: Any, request_id: str, base: str, used: str) -> None:
    """Log a URL of fal's answer that is not used: a warning once per origin, then at DEBUG level.

    A batch reads three URLs per request, so behind a relay that rewrites hosts a warning per URL
    would be 30,000 lines for 10,000 inputs (and about a fifth of the submit round's worker CPU).
    """
    try:
        origin = _origin(urlsplit(str(given)))  # the origin is_under compares
    except ValueError:  # e.g. a port that is not a number
        origin = ("?", "?", None)
    first = (base, origin) not in _foreign_origins_warned
    _foreign_origins_warned.add((base, origin))
    scheme, host, port = origin
    log.log(
        logging.WARNING if first else logging.DEBUG,
        "Ignoring %s %r of fal request %s: it is not under the configured queue URL %s; using %s instead.%s",
        name,
        given,
        request_id,
        base,
        used,
        f" Further URLs from {scheme}://{host}:{port} are logged at DEBUG level." if first else "",
    )


def coerce_handle(handle: Any, queue_url: str) -> QueueHandle:
    """Accept a :class:`QueueHandle` or its dict form; always re-checked against ``queue_url``."""
    if isinstance(handle, QueueHandle):
        handle = handle.to_dict()
    return QueueHandle.from_dict(handle, queue_url=queue_url)


GONE_STATUSES = frozenset({404, 410})


def gone_error(handle: QueueHandle, error: FalError) -> FalResultExpiredError:
    """fal answered 404/410 for a request we submitted: its result is gone, most likely after it was billed."""
    return FalResultExpiredError(
        f"fal no longer has request {handle.request_id} for {handle.model_id} ({error.message}). It most likely "
        "completed and was billed, and its result outlived fal's retention (1 hour; 6 minutes when 10 KB or "
        "more; longer with payload storage, X-Fal-Store-IO, on). A retry of the task submits the input again, "
        "a new billed generation.",
        status_code=error.status_code,
        request_id=handle.request_id,
    )


# --------------------------------------------------------------------------- statuses


@dataclass(frozen=True)
class QueueStatus:
    """One status answer. ``logs`` holds fal's log entries (``message``, ``level``, ``source``,
    ``timestamp``) when they were asked for."""

    status: str
    request_id: str
    queue_position: int | None = None
    logs: tuple[dict[str, Any], ...] = ()
    error: str | None = None
    error_type: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def failed(self) -> bool:
        return self.completed and (self.error is not None or self.error_type is not None)

    def failure(self, handle: QueueHandle) -> FalError | None:
        """The error a COMPLETED status with ``error``/``error_type`` stands for, else None.

        Classified by its error type with the same table as an HTTP answer (a ``runner_server_error``
        is a :class:`FalServerError`, a ``bad_request`` a permanent :class:`FalClientError` ...).
        """
        if not self.failed:
            return None
        failure = error_from_failed_status(self.error, self.error_type, self.request_id)
        failure.message = f"fal request {self.request_id} for {handle.model_id} failed: {failure.message}"
        failure.status_code = None  # a status poll reports no HTTP status for the model's failure
        return failure

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["logs"] = list(self.logs)
        return data


def parse_status(body: Any, handle: QueueHandle) -> QueueStatus:
    """Read a status answer; raises :class:`FalError` if it is not one."""
    if not isinstance(body, Mapping) or not isinstance(body.get("status"), str):
        error = FalError(
            f"fal's queue answered a status poll of request {handle.request_id} with no status: {_short(body)}",
            request_id=handle.request_id,
        )
        error.retryable = True  # a garbled answer to a poll, which changes nothing on fal: ask again
        raise error
    position = body.get("queue_position")
    raw_logs = body.get("logs")
    logs = tuple(entry for entry in raw_logs if isinstance(entry, Mapping)) if isinstance(raw_logs, list) else ()
    error = body.get("error")
    error_type = body.get("error_type")
    metrics = body.get("metrics")
    return QueueStatus(
        status=body["status"],
        request_id=str(body.get("request_id") or handle.request_id),
        queue_position=position if isinstance(position, int) and not isinstance(position, bool) else None,
        logs=tuple(dict(entry) for entry in logs),
        error=None if error is None else (error if isinstance(error, str) else json.dumps(error)),
        error_type=error_type if isinstance(error_type, str) else None,
        metrics=dict(metrics) if isinstance(metrics, Mapping) else {},
    )


class QueueProgress:
    """What is new in each status poll: runner log lines not seen before and queue moves.

    fal returns the request's logs so far on every poll; this keeps each line from being
    logged twice. Not thread-safe: use one per request and poller.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, str, str]] = set()
        self._position: int | None = None
        self._status: str | None = None

    def updates(self, status: QueueStatus) -> list[tuple[int, str]]:
        """``(logging level, message)`` pairs to log for this poll, oldest first."""
        lines: list[tuple[int, str]] = []
        moved: tuple[int, str] | None = None
        if status.status == IN_QUEUE and status.queue_position is not None and status.queue_position != self._position:
            self._position = status.queue_position
            moved = (logging.INFO, f"fal request {status.request_id} is queued at position {self._position}")
        elif status.status != self._status and status.status != IN_QUEUE:
            moved = (logging.INFO, f"fal request {status.request_id} is {status.status}")
        self._status = status.status
        if moved is not None and not status.completed:
            lines.append(moved)
        for entry in status.logs:
            key = (
                str(entry.get("timestamp", "")),
                str(entry.get("level", "")),
                str(entry.get("source", "")),
                str(entry.get("message", "")),
            )
            if key in self._seen:
                continue
            self._seen.add(key)
            level = _LOG_LEVELS.get(str(entry.get("level", "INFO")).upper(), logging.INFO)
            stamp = f"{entry['timestamp']} " if entry.get("timestamp") else ""
            lines.append((level, f"fal runner: {stamp}{entry.get('message', '')}"))
        if moved is not None and status.completed:
            lines.append(moved)
        return lines


# --------------------------------------------------------------------------- helpers


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
