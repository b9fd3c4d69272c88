"""fal's gateway: the synchronous run endpoint, the queue API and the file CDN."""

from __future__ import annotations

import hmac
import json
import math
import re
import time
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from . import models
from .messages import Request, Response, dumps, error
from .queue import QueueRequest
from .state import DEFAULT_DETAIL, Fault, FileEntry

if TYPE_CHECKING:
    from .core import FalEmulator

SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
TIMEOUT_HEADERS = ("X-Fal-Request-Timeout", "X-Fal-Request-Start-Timeout")  # the latter wins
LIFECYCLE_HEADER = "X-Fal-Object-Lifecycle-Preference"
SSE_POLL = 0.1
SSE_MAX_SECONDS = 3600.0


class _Files:
    """The RunContext handed to models: collects files, registered once the request succeeds."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.entries: list[FileEntry] = []

    def _url(self, entry: FileEntry) -> str:
        self.entries.append(entry)
        return f"{self.base_url}/files/{entry.file_id}/{entry.name}"

    def create_image(self, key: bytes, width: int, height: int, file_name: str) -> str:
        entry = FileEntry(key.hex()[:32], file_name, "image/png", "png", width=width, height=height, key=key)
        return self._url(entry)

    def create_blob(self, key: bytes, size: int, content_type: str, file_name: str) -> str:
        return self._url(FileEntry(key.hex()[:32], file_name, content_type, "stream", size=size, key=key))

    def commit(self, emu: FalEmulator, lifespan: float | None) -> None:
        for entry in self.entries:
            emu.state.add_file(entry, lifespan)


# --------------------------------------------------------------------------- shared checks


def split_path(path: str) -> list[str] | None:
    """Valid model path segments, or None (empty, ``.``/``..``, ``%``, odd characters...)."""
    if path.endswith("/"):
        path = path[:-1]
    segments = path.split("/") if path else []
    if not segments or any(not SEGMENT.match(s) or s in (".", "..") for s in segments):
        return None
    return segments


def check_auth(emu: FalEmulator, request: Request) -> Response | None:
    header = request.header("Authorization") or ""
    expected = f"Key {emu.api_key}"
    if not hmac.compare_digest(header.encode("utf-8", "replace"), expected.encode("utf-8", "replace")):
        return error(401, "Unauthorized: invalid or missing API key")
    reason = emu.state.lock_reason
    if reason is not None:
        return error(403, f"User is locked. Reason: {reason}")
    return None


def fault_response(fault: Fault) -> Response:
    """The answer an injected fault asks for."""
    if fault.drop_connection:
        return Response(status=0, drop=True)
    headers: list[tuple[str, str]] = []
    if fault.needs_retry:
        headers.append(("X-Fal-Needs-Retry", "1"))
    if fault.retryable is not None:
        headers.append(("X-Fal-Retryable", "true" if fault.retryable else "false"))
    if fault.retry_after is not None:
        headers.append(("Retry-After", str(fault.retry_after)))
    if fault.timeout_type is not None:
        headers.append(("X-Fal-Request-Timeout-Type", fault.timeout_type))
    headers.extend(fault.headers.items())
    if fault.html:
        try:
            title = f"{fault.status} {HTTPStatus(fault.status).phrase}"
        except ValueError:
            title = str(fault.status)
        page = (
            f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
            f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
        )
        return Response(status=fault.status, body=page.encode(), content_type="text/html", headers=headers)
    detail = fault.detail
    if detail is None:
        detail = _default_detail(fault.status, fault.error_type)
    return error(fault.status, detail, fault.error_type, headers)


def _default_detail(status: int, error_type: str | None) -> str:
    if error_type in DEFAULT_DETAIL:
        return DEFAULT_DETAIL[error_type]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _bad_request(detail: str) -> Response:
    return error(400, detail, "bad_request")


def parse_start_timeout(request: Request) -> tuple[float | None, Response | None]:
    """The start timeout from the headers (``X-Fal-Request-Start-Timeout`` wins); must be >= 1."""
    timeout: float | None = None
    for name in TIMEOUT_HEADERS:
        raw = request.header(name)
        if raw is None:
            continue
        try:
            value = float(raw.strip())
        except ValueError:
            return None, _bad_request(f"{name} must be a number of seconds, got {raw[:50]!r}")
        if not math.isfinite(value) or value < 1:
            return None, _bad_request(f"{name} must be at least 1 second")
        timeout = value
    return timeout, None


def parse_lifespan(emu: FalEmulator, request: Request) -> tuple[float | None, Response | None]:
    """Seconds the request's files live (None: forever) from the lifecycle header, else the default."""
    raw = request.header(LIFECYCLE_HEADER)
    if raw is None:
        return emu.default_file_lifespan, None
    try:
        preference = json.loads(raw)
    except ValueError:
        return None, _bad_request(f"{LIFECYCLE_HEADER} must be a JSON object")
    if not isinstance(preference, dict):
        return None, _bad_request(f"{LIFECYCLE_HEADER} must be a JSON object")
    if "expiration_duration_seconds" not in preference:
        return emu.default_file_lifespan, None
    value = preference["expiration_duration_seconds"]
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None, _bad_request("expiration_duration_seconds must be a non-negative number or null")
    return float(value), None


def parse_body(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
    """The JSON object body, or a 422 in fal's list shape."""
    if not request.body.strip():
        return None, _validation([{"loc": ["body"], "msg": "Field required", "type": "missing"}])
    try:
        body = request.json()
    except ValueError as exc:
        return None, _validation(
            [
                {
                    "loc": ["body", 0],
                    "msg": "JSON decode error",
                    "type": "json_invalid",
                    "ctx": {"error": str(exc)},
                }
            ]
        )
    if not isinstance(body, dict):
        return None, _validation(
            [
                {
                    "loc": ["body"],
                    "msg": "Input should be a valid dictionary or object to extract fields from",
                    "type": "model_attributes_type",
                }
            ]
        )
    return body, None


def _validation(errors: list[dict[str, Any]]) -> Response:
    return Response.json(422, {"detail": errors})


def _resolve(segments: list[str]) -> tuple[models.Model | None, Response | None]:
    found = models.resolve(segments)
    if found is not None:
        return found[0], None
    app_id = models.app_id_of(segments)
    if len(segments) < 2:
        return None, error(404, "Not Found")
    if any(model_id.startswith(app_id + "/") for model_id in models.MODELS):
        return None, error(404, f"Endpoint '/{'/'.join(segments)}' not found")
    return None, error(404, f"Application '{app_id}' not found")


def _keys(model: models.Model, segments: list[str]) -> tuple[str, ...]:
    """Lookup keys for per-model settings: endpoint path, model id, app id."""
    return "/".join(segments), model.model_id, models.app_id_of(segments)


def _run_model(emu: FalEmulator, model: models.Model, body: dict[str, Any]) -> tuple[Any, _Files, Response | None]:
    files = _Files(emu.url)
    try:
        output = model.run(body, files)
    except models.ValidationFailed as exc:
        return None, files, _validation(exc.errors)
    return output, files, None


# --------------------------------------------------------------------------- routing


def handle(emu: FalEmulator, request: Request) -> Response:
    """Route one request that is not for the control API."""
    path = request.path
    if path.startswith("/files/"):
        return serve_file(emu, request)
    if path == "/" and request.method in ("GET", "HEAD"):
        return Response.json(200, {"service": "fal emulator", "models": sorted(models.MODELS)})
    denied = check_auth(emu, request)
    if denied is not None:
        return denied
    inner = path[len("/queue/") :] if path.startswith("/queue/") else path[1:]
    fault = emu.state.take_fault(inner.strip("/"))
    if fault is not None:
        return fault_response(fault)
    if path.startswith("/queue/"):
        return queue_route(emu, request, inner)
    if request.method != "POST":
        return error(405, "Method Not Allowed")
    return run_sync(emu, request, inner)


_Call = tuple[models.Model, float | None, float | None, dict[str, Any]]
"""An accepted model call: the model, start timeout, file lifespan and JSON body."""


def _accept_call(emu: FalEmulator, request: Request, segments: list[str]) -> _Call | Response:
    """Resolve the model and check the platform headers and the body, in fal's order.

    Returns the accepted call, or the error answer for the first check that failed.
    """
    model, missing = _resolve(segments)
    if missing is not None or model is None:
        return missing or error(404, "Not Found")
    timeout, bad = parse_start_timeout(request)
    if bad is not None:
        return bad
    lifespan, bad = parse_lifespan(emu, request)
    if bad is not None:
        return bad
    body, bad = parse_body(request)
    if bad is not None or body is None:
        return bad or error(422, [])
    return model, timeout, lifespan, body


def run_sync(emu: FalEmulator, request: Request, model_path: str) -> Response:
    segments = split_path(model_path)
    if segments is None:
        return error(404, "Not Found")
    call = _accept_call(emu, request, segments)
    if isinstance(call, Response):
        return call
    model, timeout, lifespan, body = call
    state = emu.state
    if not state.acquire_slot():
        return error(429, "Concurrent requests limit exceeded", "rate_limited")
    try:
        keys = _keys(model, segments)
        with state.lock:
            runner_wait = float(state.runner_wait.get(*keys))
            latency = float(state.latency.get(*keys))
        if timeout is not None and runner_wait > timeout:
            emu.wait(timeout)
            return error(504, "Request timed out", "request_timeout", [("X-Fal-Request-Timeout-Type", "user")])
        emu.wait(runner_wait)
        output, files, invalid = _run_model(emu, model, body)
        if invalid is not None:
            return invalid
        emu.wait(latency)
        files.commit(emu, lifespan)
        return Response(status=200, body=dumps(output))
    finally:
        state.release_slot()


# --------------------------------------------------------------------------- queue


def queue_route(emu: FalEmulator, request: Request, inner: str) -> Response:
    segments = split_path(inner)
    if segments is None:
        return error(404, "Not Found")
    app_len = 3 if segments[0] in ("workflows", "comfy") else 2
    is_request_path = len(segments) > app_len + 1 and segments[app_len] == "requests"
    if request.method == "POST":
        return queue_submit(emu, request, segments)
    if not is_request_path:
        return error(405, "Method Not Allowed")
    app_id = "/".join(segments[:app_len])
    request_id = segments[app_len + 1]
    action = "/".join(segments[app_len + 2 :])
    routes = {
        ("GET", ""): queue_result,
        ("GET", "status"): queue_status,
        ("GET", "status/stream"): queue_stream,
        ("PUT", "cancel"): queue_cancel,
    }
    handler = routes.get((request.method, action))
    if handler is None:
        if any(key[1] == action for key in routes):
            return error(405, "Method Not Allowed")
        return error(404, "Not Found")
    queued = emu.queue.get(app_id, request_id)
    if queued is None:
        return error(404, "Request not found")
    return handler(emu, request, queued)


def queue_submit(emu: FalEmulator, request: Request, segments: list[str]) -> Response:
    call = _accept_call(emu, request, segments)
    if isinstance(call, Response):
        return call
    model, timeout, lifespan, body = call
    output, files, invalid = _run_model(emu, model, body)
    if invalid is not None:
        return invalid
    state = emu.state
    keys = _keys(model, segments)
    with state.lock:
        wait = float(state.queue_wait.get(*keys)) + float(state.runner_wait.get(*keys))
        run_time = state.run_time.get(*keys)
        if run_time is None:
            run_time = state.latency.get(*keys)
    run_time = float(run_time)
    now = time.monotonic()
    request_id = str(uuid.uuid4())
    queued = QueueRequest(
        request_id=request_id,
        app_id=models.app_id_of(segments),
        model_id=model.model_id,
        queue_url=emu.queue_url,
        seq=emu.queue.next_seq(),
        submitted=now,
        start_at=now + wait,
        end_at=now + wait + run_time,
        result_status=200,
        result_body=dumps(output),
        output=output,
        webhook_url=request.query.get("fal_webhook") or None,
    )
    failure = state.take_queue_failure("/".join(segments))
    if timeout is not None and wait > timeout:
        queued.start_at = queued.end_at = now + timeout
        queued.aborted = True
        _fail(queued, 504, "Request timed out", "request_timeout")
        queued.result_headers.append(("X-Fal-Request-Timeout-Type", "user"))
    elif failure is not None:
        _fail(queued, failure.status, failure.error, failure.error_type)
    files.commit(emu, lifespan)
    emu.queue.add(queued)
    if queued.webhook_url:
        emu.dispatcher.schedule(queued, queued.end_at)
    payload = {
        "request_id": request_id,
        "status": "IN_QUEUE",
        "queue_position": emu.queue.position(queued, time.monotonic()),
        **queued.urls(),
    }
    return Response.json(200, payload, [("x-fal-request-id", request_id)])


def _fail(queued: QueueRequest, status: int, message: str, error_type: str) -> None:
    queued.error = message
    queued.error_type = error_type
    queued.output = None
    queued.result_status = status
    queued.result_body = dumps({"detail": message, "error_type": error_type})


def queue_status(emu: FalEmulator, request: Request, queued: QueueRequest) -> Response:
    with_logs = request.query.get("logs", "0").lower() in ("1", "true")
    status, body = _status_body(emu, queued, with_logs)
    return Response.json(status, body, [("x-fal-request-id", queued.request_id)])


def _status_body(emu: FalEmulator, queued: QueueRequest, with_logs: bool) -> tuple[int, dict[str, Any]]:
    with emu.state.lock:  # a consistent view while a cancel may be updating the request
        now = time.monotonic()
        return queued.status_body(now, position=emu.queue.position(queued, now), with_logs=with_logs)


def queue_stream(emu: FalEmulator, request: Request, queued: QueueRequest) -> Response:
    with_logs = request.query.get("logs", "0").lower() in ("1", "true")

    def events() -> Iterator[bytes]:
        previous = b""
        deadline = time.monotonic() + SSE_MAX_SECONDS
        while time.monotonic() < deadline:
            _, body = _status_body(emu, queued, with_logs)
            data = dumps(body)
            if data != previous:
                yield b"data: " + data + b"\n\n"
                previous = data
            if body["status"] == "COMPLETED" or emu.wait(SSE_POLL):
                return

    return Response(status=200, content_type="text/event-stream", events=events())


def queue_result(emu: FalEmulator, request: Request, queued: QueueRequest) -> Response:
    with emu.state.lock:
        if queued.status(time.monotonic()) != "COMPLETED":
            return error(400, "Request is still in progress")
        headers = [("x-fal-request-id", queued.request_id), *queued.result_headers]
        if queued.error_type is not None:
            headers.append(("X-Fal-Error-Type", queued.error_type))
        return Response(status=queued.result_status, body=queued.result_body, headers=headers)


def queue_cancel(emu: FalEmulator, request: Request, queued: QueueRequest) -> Response:
    with emu.state.lock:
        if emu.state.cancel_completes.get(queued.model_id, queued.app_id) and not queued.aborted:
            emu.queue.complete_now(queued)  # it finishes just as the cancel arrives
            if queued.webhook_url:
                emu.dispatcher.schedule(queued, queued.end_at)
    if not emu.queue.cancel(queued):
        return Response.json(400, {"status": "ALREADY_COMPLETED"})
    if queued.webhook_url:
        emu.dispatcher.schedule(queued, queued.end_at)
    return Response.json(202, {"status": "CANCELLATION_REQUESTED"})


# --------------------------------------------------------------------------- files


def serve_file(emu: FalEmulator, request: Request) -> Response:
    if request.method not in ("GET", "HEAD"):
        return error(405, "Method Not Allowed")
    parts = request.path[len("/files/") :].split("/")
    if len(parts) != 2:
        return error(404, "File not found")
    entry = emu.state.get_file(parts[0])
    if entry is None or entry.name != parts[1]:
        return error(404, "File not found")
    return Response(status=200, content_type=entry.content_type, file=entry)
