"""The HTTP control API under ``/_emulator/``: a thin JSON layer over EmulatorHost's Python methods.

Every route but ``health`` needs the emulator's API key (``Authorization: Key <key>``, as a
gateway call) or, when one is set, the separate control token (``X-Emulator-Control-Token``):
the routes lock the account, inject faults and read recorded prompts. A locked account does
not lock the control API out.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from .host import CONTROL_PREFIX as PREFIX
from .host import EmulatorHost
from .messages import Request, Response, error

# route name -> name of the EmulatorHost method that takes the JSON body as keyword arguments
SETTERS: dict[str, str] = {
    "latency": "set_latency",
    "runner-wait": "set_runner_wait",
    "queue-timing": "set_queue_timing",
    "concurrency-limit": "set_concurrency_limit",
    "faults": "inject_fault",
    "clear-faults": "clear_faults",
    "lock": "lock_account",
    "unlock": "unlock_account",
    "fail-queued": "fail_queued",
    "complete-on-cancel": "complete_on_cancel",
    "cancel-honoured": "set_cancel_honoured",
    "file-fault": "set_file_fault",
    "upload-fault": "fail_upload",
    "reset": "reset",
    "outage": "refuse_connections",
}

READERS: dict[str, Callable[[EmulatorHost], Any]] = {
    "health": lambda emu: {"status": "ok"},
    "requests": lambda emu: [record.to_dict() for record in emu.requests],
    "webhooks": lambda emu: [record.to_dict() for record in emu.webhooks],
}


#: Header carrying the control token (``FalEmulator(control_token=...)``, ``$FAL_EMULATOR_CONTROL_TOKEN``).
CONTROL_TOKEN_HEADER = "X-Emulator-Control-Token"
#: Routes anyone may call: a readiness check that reveals nothing.
OPEN_ROUTES = frozenset({"health"})


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def control_authorized(emu: EmulatorHost, request: Request) -> bool:
    """Whether ``request`` carries the API key or the control token."""
    if _same(request.header("Authorization"), f"Key {emu.api_key}"):
        return True
    token = emu.control_token
    return bool(token) and _same(request.header(CONTROL_TOKEN_HEADER), token)


def handle_control(emu: EmulatorHost, request: Request) -> Response:
    name = request.path[len(PREFIX) :].strip("/")
    if name not in OPEN_ROUTES and not control_authorized(emu, request):
        return error(
            401,
            "Unauthorized: the emulator's control API needs 'Authorization: Key <the emulator key>' "
            f"or '{CONTROL_TOKEN_HEADER}: <the control token>'",
        )
    if request.method == "GET" and name in READERS:
        return Response.json(200, READERS[name](emu))
    if request.method == "DELETE" and name == "faults":
        name, request.method = "clear-faults", "POST"
    if request.method != "POST" or name not in SETTERS:
        if name in READERS or name in SETTERS:
            return error(405, "Method Not Allowed")
        return error(404, f"Unknown control route {name!r}")
    payload: Any = {}
    if request.body.strip():
        try:
            payload = request.json()
        except ValueError:
            return error(400, "body must be a JSON object")
    if not isinstance(payload, dict):
        return error(400, "body must be a JSON object")
    method = getattr(emu, SETTERS[name])
    try:
        method(**payload)
    except (TypeError, ValueError) as exc:
        return error(400, str(exc))
    return Response.json(200, {"ok": True})
