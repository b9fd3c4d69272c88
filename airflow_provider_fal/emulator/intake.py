"""What fal's gateway checks before it runs a model, shared by the sync endpoint and the queue.

Paths, the key, injected faults, the platform headers (start timeout, lifecycle) and the body,
in fal's order; and running a model and keeping the files it made.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from http import HTTPStatus
from typing import Any

from . import models
from .host import EmulatorHost
from .messages import Request, Response, error
from .state import DEFAULT_DETAIL, Fault, FileEntry

SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
TIMEOUT_HEADERS = ("X-Fal-Request-Timeout", "X-Fal-Request-Start-Timeout")  # the latter wins
LIFECYCLE_HEADER = "X-Fal-Object-Lifecycle-Preference"


class Files:
    """The RunContext handed to models: collects files, registered once the request succeeds."""

    def __init__(self, base_url: str, lookup: Any = None) -> None:
        self.base_url = base_url
        self.entries: list[FileEntry] = []
        self._lookup = lookup  # file id -> FileEntry | None: the emulator's file store

    def read_file(self, url: str) -> FileEntry | None:
        """The emulator's own file at ``url`` (an uploaded or generated one), or None."""
        prefix = f"{self.base_url}/files/"
        parts = url[len(prefix) :].split("/") if url.startswith(prefix) else []
        entry = self._lookup(parts[0]) if len(parts) == 2 and self._lookup is not None else None
        return entry if entry is not None and entry.name == parts[1] else None

    def _url(self, entry: FileEntry) -> str:
        self.entries.append(entry)
        return f"{self.base_url}/files/{entry.file_id}/{entry.name}"

    def create_image(self, key: bytes, width: int, height: int, file_name: str) -> str:
        entry = FileEntry(key.hex()[:32], file_name, "image/png", "png", width=width, height=height, key=key)
        return self._url(entry)

    def create_blob(self, key: bytes, size: int, content_type: str, file_name: str) -> str:
        return self._url(FileEntry(key.hex()[:32], file_name, content_type, "stream", size=size, key=key))

    def commit(self, emu: EmulatorHost, lifespan: float | None) -> None:
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


def check_auth(emu: EmulatorHost, request: Request) -> Response | None:
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


def parse_lifespan(emu: EmulatorHost, request: Request) -> tuple[float | None, Response | None]:
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


def model_keys(model: models.Model, segments: list[str]) -> tuple[str, ...]:
    """Lookup keys for per-model settings: endpoint path, model id, app id."""
    return "/".join(segments), model.model_id, models.app_id_of(segments)


def run_model(emu: EmulatorHost, model: models.Model, body: dict[str, Any]) -> tuple[Any, Files, Response | None]:
    files = Files(emu.url, emu.state.get_file)
    try:
        output = model.run(body, files)
    except models.ValidationFailed as exc:
        return None, files, _validation(exc.errors)
    return output, files, None


Call = tuple[models.Model, float | None, float | None, dict[str, Any]]
"""An accepted model call: the model, start timeout, file lifespan and JSON body."""


def accept_call(emu: EmulatorHost, request: Request, segments: list[str]) -> Call | Response:
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
