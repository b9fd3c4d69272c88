"""The fal error family.

Every error fal (or the network between us and fal) can produce maps onto one class here.
Each carries what a user needs to act on it: the HTTP status, fal's ``error_type``, the
``x-fal-request-id`` to quote to fal support, and a readable detail.

Two flags drive behaviour elsewhere:

* ``retryable``: the client may send the same request again (fal's error semantics say the
  request did not run, or asked for a retry).
* ``permanent``: retrying cannot fix it (bad input, bad key, locked account, the user's own
  start timeout). The operators fail the Airflow task without spending Airflow-level retries.

This module imports nothing from Airflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class FalError(Exception):
    """Base class of every error raised by this provider about fal."""

    retryable: bool = False
    permanent: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        request_id: str | None = None,
        detail: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.request_id = request_id
        self.detail = detail
        self.retry_after = retry_after

    def __str__(self) -> str:
        context = []
        if self.status_code is not None:
            context.append(f"HTTP {self.status_code}")
        if self.error_type:
            context.append(f"error_type={self.error_type}")
        if self.request_id:
            context.append(f"request_id={self.request_id}")
        return f"{self.message} ({', '.join(context)})" if context else self.message

    def to_dict(self) -> dict[str, Any]:
        """This error as JSON, e.g. for a batch result entry in XCom or a trigger event.

        :meth:`from_dict` turns it back into an error of the same class with the same flags.
        """
        data = {
            "error": type(self).__name__,
            "message": self.message,
            "status_code": self.status_code,
            "error_type": self.error_type,
            "request_id": self.request_id,
            "detail": self.detail,
            "permanent": bool(self.permanent),
        }
        errors = getattr(self, "errors", None)
        if errors is not None:
            data["errors"] = errors
        return data

    @classmethod
    def from_dict(cls, data: Any) -> FalError:
        """The error :meth:`to_dict` described: its class (if it is a known ``FalError``), fields and flags."""
        if not isinstance(data, Mapping):
            return FalError(f"fal request failed: {data!r}")
        error_class = _error_class(str(data.get("error")))
        error = error_class.__new__(error_class)
        FalError.__init__(
            error,
            str(data.get("message") or "fal request failed"),
            status_code=data.get("status_code"),
            error_type=data.get("error_type"),
            request_id=data.get("request_id"),
            detail=data.get("detail"),
        )
        if isinstance(error, FalValidationError) or "errors" in data:
            error.errors = list(data.get("errors") or [])  # type: ignore[attr-defined]
        if data.get("permanent") is not None:
            error.permanent = bool(data["permanent"])
        return error


def _error_class(name: str) -> type[FalError]:
    """The loaded ``FalError`` subclass called ``name`` (this family, or one defined elsewhere), else FalError."""
    pending: list[type[FalError]] = [FalError]
    while pending:
        current = pending.pop()
        if current.__name__ == name:
            return current
        pending.extend(current.__subclasses__())
    return FalError


class FalConfigurationError(FalError, ValueError):
    """Bad input or configuration, found before any request was sent.

    The message names the offending field and how to fix it.
    """

    permanent = True


class FalTriggererConnectionError(FalConfigurationError):
    """The triggerer could not read the fal connection that the worker which deferred the task used.

    Not permanent: the fal request runs on, and a retry of the task (on a worker, which has the
    connection) reattaches to it once the triggerer is given the same connection.
    """

    permanent = False


class FalResultExpiredError(FalError):
    """fal no longer has a request we submitted (404/410 on its status or result).

    It most likely completed (and was billed) and its result outlived fal's retention (1 hour,
    6 minutes when 10 KB or more). Not permanent: a retry of the task submits the input again.
    """


class FalAuthError(FalError):
    """401/403: the API key is missing, wrong, or lacks access."""

    permanent = True


class FalLockedAccountError(FalAuthError):
    """403 ``User is locked``: fal's message (e.g. exhausted balance) is kept verbatim."""


class FalValidationError(FalError):
    """422: the model rejected its input. ``errors`` keeps fal's list of field errors."""

    permanent = True

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.errors = errors or []


class FalClientError(FalError):
    """Other 4xx answers (400 bad request, 404 unknown model, 499 cancelled ...)."""

    permanent = True


class FalStartTimeoutError(FalError):
    """504 with ``X-Fal-Request-Timeout-Type: user``: no runner started within the start timeout.

    It is the caller's own deadline, so it is never retried by the client.
    """

    permanent = True


class FalRateLimitError(FalError):
    """429: the account's concurrency limit was hit. Retried with backoff (in a batch, a synchronous run
    is resent as soon as one of the batch's requests frees a slot)."""

    retryable = True


class FalTransientError(FalError):
    """502/503/504 (including HTML pages from proxies) or ``X-Fal-Needs-Retry: 1``."""

    retryable = True


class FalServerError(FalError):
    """500 ``runner_server_error``/``internal_error``: not retried by the client (fal has not
    said such a request is safe to send again), but an Airflow-level retry may help."""


class FalConnectError(FalError):
    """The connection failed before the request was sent (refused, DNS, connect timeout).

    Nothing reached fal, so nothing was billed: safe to retry.
    """

    retryable = True


class FalRequestLostError(FalError):
    """The request was sent but its answer never arrived (read timeout, dropped connection).

    fal cancels a synchronous request whose connection drops, but may already have billed
    it, so the client never sends it again on its own. Use the queue (``use_queue`` or
    ``deferrable``) for generations that may outlast the connection.
    """


class FalRequestFailedError(FalError):
    """A queued request ended without a deliverable result for a reason no HTTP answer carries
    (e.g. a batch input cancelled on fal when the batch was killed). A request whose status says
    it failed raises the model's own error instead, read from its result."""


class FalTimeoutError(FalError):
    """Waiting for a queued request took longer than allowed; the request was cancelled."""
