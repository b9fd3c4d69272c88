"""fal's gateway: routes a request to the synchronous run endpoint, the queue API or the file CDN."""

from __future__ import annotations

import time

from . import models
from .cdn import cdn_route
from .host import EmulatorHost
from .intake import accept_call, check_auth, fault_response, model_keys, run_model, split_path
from .messages import Request, Response, dumps, error
from .queue_api import queue_route
from .signing import JWKS_PATH


def handle(emu: EmulatorHost, request: Request) -> Response:
    """Route one request that is not for the control API."""
    path = request.path
    uploaded = cdn_route(emu, request)
    if uploaded is not None:
        return uploaded
    if path.startswith("/files/"):
        return serve_file(emu, request)
    if path == "/" and request.method in ("GET", "HEAD"):
        return Response.json(200, {"service": "fal emulator", "models": sorted(models.MODELS)})
    if path == JWKS_PATH and request.method in ("GET", "HEAD"):  # a public key: no auth, as on fal
        return Response.json(200, emu.webhook_jwks())
    denied = check_auth(emu, request)
    if denied is not None:
        return denied
    if path == PRICING_PATH:
        return pricing_answer(request)
    inner = path[len("/queue/") :] if path.startswith("/queue/") else path[1:]
    fault = emu.state.take_fault(inner.strip("/"))
    if fault is not None:
        return fault_response(fault)
    if path.startswith("/queue/"):
        return queue_route(emu, request, inner)
    if request.method != "POST":
        return error(405, "Method Not Allowed")
    return run_sync(emu, request, inner)


def run_sync(emu: EmulatorHost, request: Request, model_path: str) -> Response:
    segments = split_path(model_path)
    if segments is None:
        return error(404, "Not Found")
    call = accept_call(emu, request, segments)
    if isinstance(call, Response):
        return call
    model, timeout, lifespan, body = call
    state = emu.state
    if not state.acquire_slot(emu.queue.in_progress(time.monotonic())):
        # fal-api.md Concurrency: sync over the limit is 429 concurrent_requests_limit + X-Fal-Needs-Retry: 1
        limited = "concurrent_requests_limit"
        return error(429, "Concurrent requests limit exceeded", limited, [("X-Fal-Needs-Retry", "1")])
    try:
        keys = model_keys(model, segments)
        with state.lock:
            runner_wait = float(state.runner_wait.get(*keys))
            latency = float(state.latency.get(*keys))
        if timeout is not None and runner_wait > timeout:
            emu.wait(timeout)
            return error(504, "Request timed out", "request_timeout", [("X-Fal-Request-Timeout-Type", "user")])
        emu.wait(runner_wait)
        output, files, invalid = run_model(emu, model, body)
        if invalid is not None:
            return invalid
        emu.wait(latency)
        files.commit(emu, lifespan)
        return Response(
            status=200, body=dumps(output), headers=[(BILLABLE_UNITS, f"{models.billable_units(output):g}")]
        )
    finally:
        state.release_slot()


# --------------------------------------------------------------------------- billing


#: fal's Platform API: prices per endpoint (fal-api.md "Billing and cost"); the emulator serves it on its own host.
PRICING_PATH = "/v1/models/pricing"
#: The header of a result that says how many units it billed.
BILLABLE_UNITS = "X-Fal-Billable-Units"


def pricing_answer(request: Request) -> Response:
    if request.method != "GET":
        return error(405, "Method Not Allowed")
    endpoint_id = request.query.get("endpoint_id") or ""
    if not endpoint_id:
        body = {"error": {"type": "validation_error", "message": "endpoint_id is required"}}
        return Response.json(422, body)
    return Response.json(200, {"prices": models.pricing(endpoint_id), "next_cursor": None, "has_more": False})


# --------------------------------------------------------------------------- files


def serve_file(emu: EmulatorHost, request: Request) -> Response:
    if request.method not in ("GET", "HEAD"):
        return error(405, "Method Not Allowed")
    parts = request.path[len("/files/") :].split("/")
    if len(parts) != 2:
        return error(404, "File not found")
    entry = emu.state.get_file(parts[0])
    if entry is None or entry.name != parts[1]:
        return error(404, "File not found")
    return Response(status=200, content_type=entry.content_type, file=entry)
