"""fal's queue API: submit, status (and its event stream), result and cancel."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from . import models
from .host import EmulatorHost
from .intake import accept_call, model_keys, run_model, split_path
from .messages import Request, Response, dumps, error
from .queue import QueueRequest

SSE_POLL = 0.1
SSE_MAX_SECONDS = 3600.0


def queue_route(emu: EmulatorHost, request: Request, inner: str) -> Response:
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


def queue_submit(emu: EmulatorHost, request: Request, segments: list[str]) -> Response:
    call = accept_call(emu, request, segments)
    if isinstance(call, Response):
        return call
    model, timeout, lifespan, body = call
    # fal's queue takes any JSON object: a model that rejects its input still runs (IN_PROGRESS,
    # then COMPLETED), and the 422 with its field list comes back on the result GET.
    output, files, invalid = run_model(emu, model, body)
    state = emu.state
    keys = model_keys(model, segments)
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
        ready_at=now + wait,
        run_time=run_time,
        start_deadline=None if timeout is None else now + timeout,
        result_status=200,
        result_body=dumps(output),
        output=output,
        webhook_url=request.query.get("fal_webhook") or None,
    )
    failure = state.take_queue_failure("/".join(segments))
    if failure is not None:
        queued.fail(failure.status, failure.error, failure.error_type)
    elif invalid is not None:
        queued.output = None
        queued.result_status, queued.result_body = invalid.status, invalid.body
    else:
        queued.result_headers.append(("X-Fal-Billable-Units", f"{models.billable_units(output):g}"))
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


def queue_status(emu: EmulatorHost, request: Request, queued: QueueRequest) -> Response:
    with_logs = request.query.get("logs", "0").lower() in ("1", "true")
    status, body = _status_body(emu, queued, with_logs)
    return Response.json(status, body, [("x-fal-request-id", queued.request_id)])


def _status_body(emu: EmulatorHost, queued: QueueRequest, with_logs: bool) -> tuple[int, dict[str, Any]]:
    with emu.state.lock:  # a consistent view while a cancel may be updating the request
        now = time.monotonic()
        return queued.status_body(now, position=emu.queue.position(queued, now), with_logs=with_logs)


def queue_stream(emu: EmulatorHost, request: Request, queued: QueueRequest) -> Response:
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


def queue_result(emu: EmulatorHost, request: Request, queued: QueueRequest) -> Response:
    with emu.state.lock:
        if queued.status(time.monotonic()) != "COMPLETED":
            return error(400, "Request is still in progress")
        headers = [("x-fal-request-id", queued.request_id), *queued.result_headers]
        if queued.error_type is not None:
            headers.append(("X-Fal-Error-Type", queued.error_type))
        return Response(status=queued.result_status, body=queued.result_body, headers=headers)


def queue_cancel(emu: EmulatorHost, request: Request, queued: QueueRequest) -> Response:
    with emu.state.lock:
        if emu.state.cancel_completes.get(queued.model_id, queued.app_id) and not queued.aborted:
            emu.queue.complete_now(queued)  # it finishes just as the cancel arrives
            if queued.webhook_url:
                emu.dispatcher.schedule(queued, queued.end_at)
        honoured = emu.state.cancel_honoured.get(queued.model_id, queued.app_id)
    if not emu.queue.cancel(queued, stop_running=honoured):
        return Response.json(400, {"status": "ALREADY_COMPLETED"})
    if queued.webhook_url and queued.aborted:
        emu.dispatcher.schedule(queued, queued.end_at)
    return Response.json(202, {"status": "CANCELLATION_REQUESTED"})
