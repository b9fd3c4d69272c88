"""Turn an HTTP answer from fal into a typed :class:`FalError`, following fal's error semantics.

Works on plain values (status, a case-insensitive header mapping, body bytes) so that the
synchronous client (requests) and the trigger (httpx) share one implementation.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

from airflow_provider_fal.exceptions import (
    FalAuthError,
    FalClientError,
    FalError,
    FalLockedAccountError,
    FalRateLimitError,
    FalServerError,
    FalStartTimeoutError,
    FalTransientError,
    FalValidationError,
)

REQUEST_ID_HEADER = "x-fal-request-id"
_MAX_DETAIL_CHARS = 2000
_HTML_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def secret_forms(secret: str) -> tuple[str, ...]:
    """The API key as a server may reflect it: itself, URL-encoded (``id%3Asecret``), and base64
    of the ``Authorization`` value (``Key <key>``) or of the key alone. Longest first."""
    forms = {
        secret,
        quote(secret, safe=""),
        base64.b64encode(f"Key {secret}".encode()).decode(),
        base64.b64encode(secret.encode()).decode(),
    }
    return tuple(sorted(forms, key=len, reverse=True))


def scrub_secret(text: str, secret: str | None) -> str:
    """``text`` with every form of ``secret`` (see :func:`secret_forms`) replaced by ``***``."""
    if not secret:
        return text
    for form in secret_forms(secret):
        text = text.replace(form, "***")
    return text


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value.strip() if isinstance(value, str) else None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def format_validation_errors(errors: list[Any]) -> list[str]:
    """fal's 422 list as lines like ``prompt: Field required``."""
    lines = []
    for item in errors:
        if not isinstance(item, Mapping):
            lines.append(str(item))
            continue
        loc = [str(part) for part in item.get("loc") or []]
        if loc and loc[0] == "body":
            loc = loc[1:]
        where = ".".join(loc) or "input"
        lines.append(f"{where}: {item.get('msg') or item.get('type') or 'invalid'}")
    return lines


def _decode_body(body: bytes | str | None) -> tuple[Any, str]:
    """(parsed JSON or None, text) of a response body."""
    if body is None:
        return None, ""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        return json.loads(text), text
    except ValueError:
        return None, text


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL_CHARS else text[:_MAX_DETAIL_CHARS] + "..."


#: Request error types fal documents as safe for the client to send again: the runner never
#: took the request (or dropped it before answering), so nothing was billed.
RESENDABLE_ERROR_TYPES = frozenset(
    {
        "request_timeout",
        "startup_timeout",
        "runner_scheduling_failure",
        "runner_connection_timeout",
        "runner_disconnected",
        "runner_connection_refused",
        "runner_connection_error",
        "runner_incomplete_response",
    }
)
#: The HTTP status fal answers with for each request error type (fal-api.md, Errors).
STATUS_OF_ERROR_TYPE = {
    "request_timeout": 504,
    "startup_timeout": 504,
    "generation_timeout": 504,
    "runner_scheduling_failure": 503,
    "runner_connection_timeout": 503,
    "runner_disconnected": 503,
    "runner_connection_refused": 503,
    "runner_connection_error": 503,
    "downstream_service_unavailable": 500,
    "runner_incomplete_response": 502,
    "runner_server_error": 500,
    "internal_error": 500,
    "internal_server_error": 500,
    "client_disconnected": 499,
    "client_cancelled": 499,
    "bad_request": 400,
    "downstream_service_error": 400,
}
_YES = frozenset({"1", "true", "yes"})
_NO = frozenset({"0", "false", "no"})
NOT_BILLED = "fal does not bill 5xx answers"


def _flag(headers: Mapping[str, str], name: str) -> bool | None:
    """A yes/no header (``1``/``true``/``yes`` or ``0``/``false``/``no``, any case); None if absent or other."""
    value = (_header(headers, name) or "").lower()
    return True if value in _YES else False if value in _NO else None


def error_from_response(
    status_code: int,
    headers: Mapping[str, str],
    body: bytes | str | None,
    *,
    secret: str | None = None,
) -> FalError | None:
    """The error an answer stands for, or ``None`` if it is a success.

    A 2xx is always a result, whatever its headers say (``X-Fal-Needs-Retry`` is the app's
    signal to fal's queue; the result it comes with is billed). Whether an error may be sent
    again is decided, in this order, by ``X-Fal-Retryable``, then ``X-Fal-Needs-Retry``, then
    fal's table: 408 and 429; 502/503/504 from a proxy before fal (no ``x-fal-request-id``);
    a 5xx from fal with a request id only for the request error types fal says are safe
    (:data:`RESENDABLE_ERROR_TYPES`). A 422, a 401/403 and the caller's own start timeout are
    never resent unless ``X-Fal-Retryable: true`` says so for the 422.
    ``secret`` (the API key) is scrubbed from any text taken from the body, in every form
    :func:`secret_forms` lists.
    """
    if status_code < 400:
        return None
    error = _classify(status_code, headers, body, secret)
    retryable = _flag(headers, "x-fal-retryable")
    if retryable is None and not isinstance(error, FalValidationError | FalStartTimeoutError | FalAuthError):
        retryable = _flag(headers, "x-fal-needs-retry")
    if retryable is not None and not isinstance(error, FalStartTimeoutError | FalAuthError):
        error.retryable = retryable
        if retryable:
            error.permanent = False
    return error


def error_from_failed_status(detail: Any, error_type: str | None, request_id: str) -> FalError:
    """A queue status ``COMPLETED`` with ``error``/``error_type``, read with the same table as an answer.

    fal's status carries no HTTP status, so the error type's usual one stands in for it.
    """
    status_code = STATUS_OF_ERROR_TYPE.get(error_type or "", 500)
    body = json.dumps(
        {"detail": detail if detail is not None else error_type or "unknown error", "error_type": error_type}
    )
    headers = {REQUEST_ID_HEADER: request_id, **({"x-fal-error-type": error_type} if error_type else {})}
    error = error_from_response(status_code, headers, body)
    assert error is not None  # status_code >= 400
    return error


def _classify(status_code: int, headers: Mapping[str, str], body: bytes | str | None, secret: str | None) -> FalError:
    """The error class and message of an error answer, with fal's table as the default for ``retryable``."""
    parsed, text = _decode_body(body)
    if secret:
        text = scrub_secret(text, secret)
        if parsed is not None:  # JSON may spell the key with escapes (\u0074, \/): scrub it decoded
            canonical = json.dumps(parsed, ensure_ascii=False)
            cleaned = scrub_secret(canonical, secret)
            if cleaned != canonical:
                parsed, text = json.loads(cleaned), cleaned
    raw_detail = parsed.get("detail") if isinstance(parsed, Mapping) else None
    error_type = (parsed.get("error_type") if isinstance(parsed, Mapping) else None) or _header(
        headers, "x-fal-error-type"
    )
    common: dict[str, Any] = {
        "status_code": status_code,
        "error_type": error_type,
        "request_id": _header(headers, REQUEST_ID_HEADER),
    }
    is_html = "html" in (_header(headers, "content-type") or "").lower() or text.lstrip().startswith("<")
    if isinstance(raw_detail, str):
        detail = raw_detail
    elif raw_detail is not None:
        detail = json.dumps(raw_detail)
    elif is_html:
        title = _HTML_TITLE.search(text)
        detail = f"HTML error page from a proxy: {_short(title.group(1)) if title else 'no title'}"
    else:
        detail = _short(text) or "no detail"
    common["detail"] = raw_detail if raw_detail is not None else detail

    if status_code == 422:
        errors = raw_detail if isinstance(raw_detail, list) else []
        lines = format_validation_errors(errors) if errors else [detail]
        return FalValidationError("fal rejected the model input:\n  " + "\n  ".join(lines), errors=errors, **common)
    if status_code == 504 and (_header(headers, "x-fal-request-timeout-type") or "").lower() == "user":
        return FalStartTimeoutError(
            "No fal runner started the request within the start timeout (X-Fal-Request-Timeout). "
            "Raise start_timeout, or use the queue for busy models.",
            **common,
        )
    if status_code == 401:
        return FalAuthError(
            f"fal rejected the API key: {detail}. Check the 'API Key' (password) of the fal connection.",
            **common,
        )
    if status_code == 403:
        if detail.startswith("User is locked"):
            return FalLockedAccountError(detail, **common)
        return FalAuthError(f"fal refused access: {detail}", **common)
    if status_code == 429:
        return FalRateLimitError(
            f"fal rate limit (account concurrency limit reached): {detail}",
            retry_after=parse_retry_after(_header(headers, "retry-after")),
            **common,
        )
    billing = f" ({NOT_BILLED})" if status_code >= 500 else ""
    if status_code in (408, 502, 503, 504) or _flag(headers, "x-fal-needs-retry"):
        error: FalError = FalTransientError(
            f"Transient fal error: {detail}{billing}",
            retry_after=parse_retry_after(_header(headers, "retry-after")),
            **common,
        )
        reached_runner = common["request_id"] is not None and status_code >= 500
        if reached_runner and error_type not in RESENDABLE_ERROR_TYPES:
            error.retryable = False  # fal's own client never resends a 5xx that carries a request id
        return error
    if 400 <= status_code < 500:
        return FalClientError(f"fal rejected the request: {detail}", **common)
    if status_code >= 500:
        return FalServerError(f"fal server error: {detail}{billing}", **common)
    return FalError(f"Unexpected answer from fal: {detail}", **common)
