"""fal's error semantics: every answer maps onto one typed error with the right retry flags.

Network-free: :func:`error_from_response` works on status, headers and body, exactly what
the client and the trigger hand it. Header mappings are case-insensitive in both callers
(``requests`` and ``httpx``), so the same type is used here.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from urllib.parse import quote

import pytest
from requests.structures import CaseInsensitiveDict

from airflow_provider_fal.core.classify import error_from_response, format_validation_errors, parse_retry_after
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

REQUEST_ID = "0b8c2f4e-1d2a-4a57-9f43-5a0d1c1e2b3c"
SECRET = "key-id-123:key-secret-456"


def headers(**values: str) -> CaseInsensitiveDict:
    """Headers as a server sends them; ``X_Fal_Error_Type`` becomes ``X-Fal-Error-Type``."""
    result = CaseInsensitiveDict({"content-type": "application/json", "x-fal-request-id": REQUEST_ID})
    result.update({name.replace("_", "-"): value for name, value in values.items()})
    return result


def fal_error(status: int, error_type: str | None, detail: object = "something happened", **extra: str) -> FalError:
    """Classify fal's infrastructure error shape: JSON body and ``X-Fal-Error-Type`` header."""
    body = {"detail": detail}
    head = headers(**extra)
    if error_type is not None:
        body["error_type"] = error_type
        head["X-Fal-Error-Type"] = error_type
    error = error_from_response(status, head, json.dumps(body).encode())
    assert error is not None
    return error


# --------------------------------------------------------------------------- the contract's table

ERROR_TABLE = [
    # (error_type, status, class, retried by the client)
    ("request_timeout", 504, FalTransientError, True),
    ("startup_timeout", 504, FalTransientError, True),
    ("runner_scheduling_failure", 503, FalTransientError, True),
    ("runner_connection_timeout", 503, FalTransientError, True),
    ("runner_disconnected", 503, FalTransientError, True),
    ("runner_connection_refused", 503, FalTransientError, True),
    ("runner_connection_error", 503, FalTransientError, True),
    ("runner_incomplete_response", 502, FalTransientError, True),
    ("runner_server_error", 500, FalServerError, False),
    ("internal_error", 500, FalServerError, False),
    ("client_disconnected", 499, FalClientError, False),
    ("client_cancelled", 499, FalClientError, False),
    ("bad_request", 400, FalClientError, False),
]


@pytest.mark.parametrize(("error_type", "status", "cls", "retryable"), ERROR_TABLE)
def test_every_row_of_the_error_table(error_type, status, cls, retryable):
    error = fal_error(status, error_type, detail=f"detail of {error_type}")
    assert type(error) is cls
    assert error.retryable is retryable
    assert error.status_code == status
    assert error.error_type == error_type
    assert error.request_id == REQUEST_ID
    assert error.detail == f"detail of {error_type}"
    text = str(error)
    assert f"detail of {error_type}" in text
    assert f"HTTP {status}" in text and f"error_type={error_type}" in text and f"request_id={REQUEST_ID}" in text
    json.dumps(error.to_dict())  # serialisable for XCom


@pytest.mark.parametrize(("error_type", "status", "cls", "retryable"), ERROR_TABLE)
def test_error_type_from_the_header_alone(error_type, status, cls, retryable):
    head = headers(X_Fal_Error_Type=error_type)
    error = error_from_response(status, head, b'{"detail": "x"}')
    assert type(error) is cls and error.error_type == error_type and error.retryable is retryable


def test_permanent_flags():
    assert fal_error(400, "bad_request").permanent
    assert fal_error(499, "client_cancelled").permanent
    assert not fal_error(503, "runner_disconnected").permanent
    # A plain 500 is not retried by the client, but an Airflow-level retry may help.
    assert not fal_error(500, "runner_server_error").permanent


@pytest.mark.parametrize("status", [200, 201, 202, 204, 301, 304])
def test_success_is_not_an_error(status):
    assert error_from_response(status, headers(), b'{"images": []}') is None
    assert error_from_response(status, headers(), b"") is None
    assert error_from_response(status, headers(), None) is None


# --------------------------------------------------------------------------- 422


def test_422_lists_each_field_error_on_its_own_line():
    detail = [
        {"loc": ["body", "prompt"], "msg": "Field required", "type": "missing", "input": {}},
        {"loc": ["body", "image_size", "width"], "msg": "Input should be less than 2049", "type": "less_than"},
        {"loc": ["body", "num_images"], "type": "int_parsing"},
    ]
    error = error_from_response(422, headers(), json.dumps({"detail": detail}))
    assert isinstance(error, FalValidationError)
    assert error.permanent and not error.retryable
    assert error.errors == detail and error.detail == detail
    assert error.message.splitlines() == [
        "fal rejected the model input:",
        "  prompt: Field required",
        "  image_size.width: Input should be less than 2049",
        "  num_images: int_parsing",
    ]
    assert "prompt: Field required" in str(error) and "HTTP 422" in str(error)


@pytest.mark.parametrize(
    ("header", "retryable"), [("true", True), ("True", True), ("false", False), ("no", False), (None, False)]
)
def test_422_is_retried_only_when_fal_says_so(header, retryable):
    extra = {"X_Fal_Retryable": header} if header is not None else {}
    body = {"detail": [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]}
    error = error_from_response(422, headers(**extra), json.dumps(body))
    assert isinstance(error, FalValidationError) and error.retryable is retryable


def test_422_with_a_string_detail_or_no_json():
    error = error_from_response(422, headers(), b'{"detail": "prompt is too long"}')
    assert isinstance(error, FalValidationError)
    assert error.errors == [] and "prompt is too long" in error.message
    error = error_from_response(422, headers(), b"Unprocessable")
    assert isinstance(error, FalValidationError) and "Unprocessable" in error.message


@pytest.mark.parametrize(
    ("errors", "lines"),
    [
        ([{"loc": ["body", "prompt"], "msg": "Field required"}], ["prompt: Field required"]),
        ([{"loc": ["query", "x"], "msg": "bad"}], ["query.x: bad"]),
        ([{"loc": ["body"], "msg": "Field required"}], ["input: Field required"]),
        ([{"loc": [], "msg": "m"}], ["input: m"]),
        ([{"loc": ["body", "loras", 0, "path"], "msg": "m"}], ["loras.0.path: m"]),
        ([{"msg": "no location"}], ["input: no location"]),
        ([{"loc": ["body", "x"]}], ["x: invalid"]),
        (["a plain string"], ["a plain string"]),
    ],
)
def test_format_validation_errors(errors, lines):
    assert format_validation_errors(errors) == lines


# --------------------------------------------------------------------------- 401 / 403


def test_401_points_at_the_connection():
    error = error_from_response(401, headers(), b'{"detail": "Unauthorized"}')
    assert type(error) is FalAuthError and error.permanent and not error.retryable
    assert "API Key" in error.message and "Unauthorized" in error.message


def test_403_locked_account_keeps_fals_message_verbatim():
    detail = "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
    error = error_from_response(403, headers(), json.dumps({"detail": detail}))
    assert type(error) is FalLockedAccountError and isinstance(error, FalAuthError)
    assert error.message == detail
    assert str(error).startswith(detail)
    assert error.permanent and not error.retryable


def test_403_other_is_an_auth_error_not_a_lock():
    error = error_from_response(403, headers(), b'{"detail": "Forbidden: no access to this app"}')
    assert type(error) is FalAuthError
    assert "no access to this app" in error.message


# --------------------------------------------------------------------------- 504


def test_504_user_start_timeout_is_never_retried():
    error = fal_error(504, "request_timeout", "Request timed out", X_Fal_Request_Timeout_Type="user")
    assert type(error) is FalStartTimeoutError
    assert error.permanent and not error.retryable
    assert "start_timeout" in error.message
    # Header names and values are matched case-insensitively.
    error = fal_error(504, "request_timeout", "Request timed out", x_fal_request_timeout_type="USER")
    assert type(error) is FalStartTimeoutError


def test_504_without_the_user_timeout_header_is_transient():
    error = fal_error(504, "request_timeout", "Request timed out")
    assert type(error) is FalTransientError and error.retryable
    error = fal_error(504, "request_timeout", "Request timed out", X_Fal_Request_Timeout_Type="gateway")
    assert type(error) is FalTransientError and error.retryable


# --------------------------------------------------------------------------- proxies


NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


@pytest.mark.parametrize("status", [502, 503, 504])
def test_html_page_from_a_proxy_is_transient(status):
    head = CaseInsensitiveDict({"Content-Type": "text/html"})  # no request id: fal never saw it
    page = NGINX_502.replace(b"502 Bad Gateway", f"{status} Proxy Error".encode())
    error = error_from_response(status, head, page)
    assert type(error) is FalTransientError and error.retryable
    assert error.request_id is None and error.error_type is None
    assert f"HTML error page from a proxy: {status} Proxy Error" in error.message
    assert "<html>" not in error.message, "the page is summarised, not dumped"


def test_html_without_a_content_type_or_title():
    error = error_from_response(502, CaseInsensitiveDict(), b"  <html><body>oops</body></html>")
    assert type(error) is FalTransientError and "no title" in error.message


def test_long_plain_text_is_shortened():
    error = error_from_response(503, CaseInsensitiveDict(), b"x" * 10_000)
    assert type(error) is FalTransientError
    assert len(error.message) < 2100 and error.message.endswith("... (fal does not bill 5xx answers)")


def test_undecodable_body():
    error = error_from_response(502, CaseInsensitiveDict(), b"\xff\xfe\x00garbage")
    assert type(error) is FalTransientError and "garbage" in error.message


def test_empty_body():
    error = error_from_response(503, CaseInsensitiveDict(), b"")
    assert type(error) is FalTransientError and "no detail" in error.message


# --------------------------------------------------------------------------- 429 and Retry-After


def test_429_is_a_retryable_rate_limit_with_retry_after_seconds():
    error = fal_error(429, "rate_limited", "Concurrent requests limit exceeded", Retry_After="7")
    assert type(error) is FalRateLimitError and error.retryable and not error.permanent
    assert error.retry_after == 7.0
    assert "concurrency limit" in error.message


def test_429_with_retry_after_as_an_http_date():
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    error = fal_error(429, "rate_limited", "limit", Retry_After=format_datetime(when, usegmt=True))
    assert type(error) is FalRateLimitError
    # HTTP dates have whole seconds; the bound leaves room for a slow machine.
    assert 60 < error.retry_after <= 120


def test_429_without_retry_after():
    error = fal_error(429, None, "limit")
    assert type(error) is FalRateLimitError and error.retry_after is None


def test_retry_after_on_a_transient_error_is_kept():
    assert fal_error(503, "runner_disconnected", Retry_After="3").retry_after == 3.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), ("12", 12.0), ("1.5", 1.5), ("-5", 0.0), ("", None), (None, None), ("soon", None)],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value) == expected


def test_parse_retry_after_dates():
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    assert parse_retry_after(format_datetime(past, usegmt=True)) == 0.0
    future = datetime.now(timezone.utc) + timedelta(seconds=300)
    assert 240 < parse_retry_after(format_datetime(future, usegmt=True)) <= 300
    # A date without a zone is read as UTC, as HTTP requires.
    naive = (datetime.now(timezone.utc) + timedelta(seconds=300)).strftime("%a, %d %b %Y %H:%M:%S")
    assert 240 < parse_retry_after(naive) <= 300


# --------------------------------------------------------------------------- X-Fal-Needs-Retry


def test_needs_retry_makes_a_500_transient():
    error = fal_error(500, "runner_server_error", "try again", X_Fal_Needs_Retry="1")
    assert type(error) is FalTransientError and error.retryable
    assert error.error_type == "runner_server_error"


@pytest.mark.parametrize("value", ["1", "true", "yes", "0", "false"])
def test_a_2xx_is_a_result_whatever_needs_retry_says(value):
    """X-Fal-Needs-Retry is the app's signal to fal's queue; the 200 it comes with is a billed result."""
    assert error_from_response(200, headers(X_Fal_Needs_Retry=value), b"{}") is None


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes"])
def test_needs_retry_yes_in_any_spelling(value):
    error = fal_error(500, "runner_server_error", X_Fal_Needs_Retry=value)
    assert type(error) is FalTransientError and error.retryable


@pytest.mark.parametrize("value", ["0", "false", "no"])
def test_needs_retry_no_stops_a_retry_the_table_would_allow(value):
    error = fal_error(503, "runner_disconnected", X_Fal_Needs_Retry=value)
    assert type(error) is FalTransientError and not error.retryable


def test_needs_retry_does_not_override_a_permanent_answer():
    # The user's own start timeout and a 422 keep their meaning.
    error = fal_error(504, "request_timeout", X_Fal_Request_Timeout_Type="user", X_Fal_Needs_Retry="1")
    assert type(error) is FalStartTimeoutError and not error.retryable
    body = {"detail": [{"loc": ["body", "prompt"], "msg": "Field required"}]}
    error = error_from_response(422, headers(X_Fal_Needs_Retry="1"), json.dumps(body))
    assert type(error) is FalValidationError and not error.retryable


# --------------------------------------------------------------------------- X-Fal-Retryable


@pytest.mark.parametrize(
    ("status", "error_type", "cls"),
    [
        (400, "downstream_service_error", FalClientError),
        (500, "internal_server_error", FalServerError),
        (504, "generation_timeout", FalTransientError),
    ],
)
def test_retryable_true_on_any_status_allows_a_resend(status, error_type, cls):
    error = fal_error(status, error_type, "model error", X_Fal_Retryable="true", X_Fal_Request_Id="r-1")
    assert type(error) is cls and error.retryable and not error.permanent


@pytest.mark.parametrize(("status", "error_type"), [(503, "runner_disconnected"), (429, None), (502, None)])
def test_retryable_false_stops_a_resend_on_any_status(status, error_type):
    error = fal_error(status, error_type, "no", X_Fal_Retryable="false")
    assert not error.retryable


def test_retryable_wins_over_needs_retry():
    error = fal_error(500, "runner_server_error", X_Fal_Retryable="false", X_Fal_Needs_Retry="1")
    assert not error.retryable


# --------------------------------------------------------------------------- ingress vs runner


def test_a_proxy_5xx_without_a_request_id_is_resent():
    proxy = headers(Content_Type="text/html")
    del proxy["x-fal-request-id"]
    error = error_from_response(502, proxy, b"<html><title>502 Bad Gateway</title></html>")
    assert type(error) is FalTransientError and error.retryable and error.request_id is None


@pytest.mark.parametrize("error_type", [None, "generation_timeout", "internal_error"])
def test_a_5xx_that_reached_a_runner_is_not_resent_without_fals_word(error_type):
    error = fal_error(504, error_type, "the model timed out", X_Fal_Request_Id="r-2")
    assert not error.retryable and error.request_id == "r-2"


@pytest.mark.parametrize("error_type", ["runner_disconnected", "startup_timeout", "runner_incomplete_response"])
def test_request_errors_fal_calls_resendable_are_resent_even_with_a_request_id(error_type):
    assert fal_error(503, error_type, X_Fal_Request_Id="r-3").retryable


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_messages_say_they_are_not_billed(status):
    assert "fal does not bill 5xx answers" in str(fal_error(status, None, "down"))


# --------------------------------------------------------------------------- other statuses


@pytest.mark.parametrize(("status", "cls"), [(404, FalClientError), (405, FalClientError), (409, FalClientError)])
def test_other_client_errors(status, cls):
    error = error_from_response(status, headers(), b'{"detail": "Application \'fal-ai/nope\' not found"}')
    assert type(error) is cls and error.permanent and "not found" in error.message


def test_408_is_transient():
    assert type(error_from_response(408, headers(), b"")) is FalTransientError


def test_dict_detail_is_kept_and_shown_as_json():
    error = error_from_response(400, headers(), json.dumps({"detail": {"reason": "bad", "field": "x"}}))
    assert error.detail == {"reason": "bad", "field": "x"}
    assert '"reason": "bad"' in error.message


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, json.dumps({"detail": f"Invalid key {SECRET}"})),
        (403, json.dumps({"detail": f"User is locked. Reason: key {SECRET} exhausted"})),
        (400, json.dumps({"detail": {"echo": f"Key {SECRET}"}})),
        (422, json.dumps({"detail": [{"loc": ["body", "prompt"], "msg": f"bad {SECRET}", "input": SECRET}]})),
        (500, f"Traceback: Authorization: Key {SECRET}"),
        (502, f"<html><head><title>502 {SECRET}</title></head></html>"),
        (503, json.dumps({"detail": "x", "error_type": f"weird-{SECRET}"})),
    ],
)
def test_the_api_key_is_scrubbed_from_everything_taken_from_the_body(status, body):
    error = error_from_response(status, CaseInsensitiveDict(), body.encode(), secret=SECRET)
    assert error is not None
    for text in (str(error), repr(error), error.message, json.dumps(error.to_dict())):
        assert SECRET not in text
        assert "key-secret-456" not in text
    assert "***" in str(error) or "***" in json.dumps(error.to_dict())
    if isinstance(error, FalValidationError):
        assert SECRET not in json.dumps(error.errors)


REFLECTED = (
    base64.b64encode(f"Key {SECRET}".encode()).decode(),
    base64.b64encode(SECRET.encode()).decode(),
    quote(SECRET, safe=""),
)


@pytest.mark.parametrize(
    "body",
    [
        *(json.dumps({"detail": f"you sent {form}!"}) for form in REFLECTED),
        *(f"plain text: you sent {form}!" for form in REFLECTED),
        '{"detail": "you sent ' + "".join(f"\\u{ord(c):04x}" for c in SECRET) + '"}',
        json.dumps({"message": f"no detail key, {REFLECTED[0]}"}),
    ],
)
def test_reflected_forms_of_the_key_are_scrubbed(body):
    error = error_from_response(400, CaseInsensitiveDict(), body.encode(), secret=SECRET)
    texts = [str(error), repr(error), json.dumps(error.to_dict())]
    assert not [form for form in (SECRET, *REFLECTED) for text in texts if form in text], texts
    assert "***" in str(error)


def test_without_a_secret_the_body_is_kept():
    error = error_from_response(400, CaseInsensitiveDict(), b'{"detail": "plain text"}', secret=None)
    assert error.message.endswith("plain text")
