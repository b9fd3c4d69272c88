"""fal's CDN upload protocol (fal-api.md "Files and CDN upload"), served by the emulator.

* ``POST /storage/auth/token?storage_type=fal-cdn-v3`` (the API key) answers a storage token
  ``{token, token_type, base_url, expires_at}``; ``base_url`` is the emulator itself.
* ``POST /files/upload`` (``Authorization: <token_type> <token>``) stores the body and answers
  ``{access_url}``.
* ``POST /files/upload/multipart`` answers ``{access_url, uploadId}``; ``PUT
  {access_url}/multipart/{uploadId}/{n}`` stores part ``n`` and answers its ``ETag``; ``POST
  {access_url}/multipart/{uploadId}/complete`` with ``{"parts": [{"partNumber", "etag"}]}``
  joins the parts and serves the file at ``access_url``.

Uploads live in anonymous temporary files (``FileEntry`` kind ``disk``), so a large upload
costs the emulator disk, not memory. ``FalEmulator.fail_upload`` makes a step answer an error.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import IO, Any

from . import models
from .host import EmulatorHost
from .intake import check_auth, parse_lifespan
from .messages import Request, Response, error
from .state import FileEntry

TOKEN_PATH = "/storage/auth/token"
TOKEN_TYPE = "Bearer"
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_PART = re.compile(r"^/files/([0-9a-f]{32})/([^/]+)/multipart/([0-9a-f]{32})/([0-9]{1,5}|complete)$")
STEPS = ("token", "upload", "create", "part", "complete")


@dataclass
class Multipart:
    """A multipart upload in progress: its file's id, name, type, lifespan and the parts so far."""

    file_id: str
    name: str
    content_type: str
    lifespan: float | None
    parts: dict[int, tuple[IO[bytes], int, str]] = field(default_factory=dict)  # n -> (file, size, etag)


def cdn_route(emu: EmulatorHost, request: Request) -> Response | None:
    """The answer to a CDN request, or None when ``request`` is not one."""
    path, method = request.path, request.method
    if path == TOKEN_PATH:
        return _token(emu, request) if method == "POST" else error(405, "Method Not Allowed")
    if path in ("/files/upload", "/files/upload/multipart"):
        if method != "POST":
            return error(405, "Method Not Allowed")
        step = "upload" if path == "/files/upload" else "create"
        return _authorized(emu, request, step) or (_single if step == "upload" else _create)(emu, request)
    match = _PART.match(path)
    if match is None:
        return None
    file_id, name, upload_id, part = match.groups()
    step = "complete" if part == "complete" else f"part:{int(part)}"
    if method != ("POST" if part == "complete" else "PUT"):
        return error(405, "Method Not Allowed")
    denied = _authorized(emu, request, step)
    if denied is not None:
        return denied
    with emu.state.lock:
        upload = emu.state.uploads.get(upload_id)
    if upload is None or upload.file_id != file_id or upload.name != name:
        return error(404, "Upload not found")
    if part == "complete":
        return _complete(emu, request, upload_id, upload)
    number = int(part)
    if not 1 <= number <= 10_000:
        return error(400, "part number must be between 1 and 10000")
    handle = _spool(request.body)
    etag = f'"{hashlib.md5(request.body, usedforsecurity=False).hexdigest()}"'
    with emu.state.lock:
        upload.parts[number] = (handle, len(request.body), etag)
    return Response(status=200, body=b"", headers=[("ETag", etag)])


def _spool(data: bytes) -> IO[bytes]:
    """An anonymous temporary file holding ``data``; kept open by the FileEntry that serves it."""
    handle = tempfile.TemporaryFile()  # noqa: SIM115 - closed when its upload is dropped
    handle.write(data)
    return handle


def _token(emu: EmulatorHost, request: Request) -> Response:
    denied = check_auth(emu, request) or _fault(emu, "token")
    if denied is not None:
        return denied
    if request.query.get("storage_type") != "fal-cdn-v3":
        return error(400, "storage_type must be fal-cdn-v3")
    token = secrets.token_urlsafe(24)
    with emu.state.lock:
        ttl = emu.state.cdn_token_ttl
        emu.state.cdn_tokens[token] = time.monotonic() + ttl
    expires = datetime.now(timezone.utc) + timedelta(seconds=ttl)
    return Response.json(
        200, {"token": token, "token_type": TOKEN_TYPE, "base_url": emu.url, "expires_at": expires.isoformat()}
    )


def _authorized(emu: EmulatorHost, request: Request, step: str) -> Response | None:
    """401 unless the request carries a live storage token (never the API key); else the step's fault."""
    scheme, _, token = (request.header("Authorization") or "").partition(" ")
    with emu.state.lock:
        given = token.encode("utf-8", "replace")
        expiry = next((v for k, v in emu.state.cdn_tokens.items() if hmac.compare_digest(k.encode(), given)), None)
    if scheme != TOKEN_TYPE or expiry is None or time.monotonic() >= expiry:
        return error(401, "Unauthorized: missing, unknown or expired storage token")
    return _fault(emu, step)


def _fault(emu: EmulatorHost, step: str) -> Response | None:
    """The error a ``fail_upload`` fault asks this step to answer (``part`` matches every part)."""
    with emu.state.lock:
        for index, (wanted, remaining, status) in enumerate(emu.state.upload_faults):
            if wanted == step or (wanted == "part" and step.startswith("part:")):
                if remaining is not None:
                    if remaining <= 1:
                        del emu.state.upload_faults[index]
                    else:
                        emu.state.upload_faults[index][1] = remaining - 1
                return error(status, f"Injected upload failure ({step})")
    return None


def _file_name(emu: EmulatorHost, request: Request) -> tuple[str, str]:
    content_type = request.header("Content-Type") or "application/octet-stream"
    name = request.header("X-Fal-File-Name") or ""
    if not _NAME.match(name) or name in (".", ".."):
        name = "upload." + models.EXTENSIONS.get(content_type.split(";")[0].strip().lower(), "bin")
    return name, content_type


def _serve(
    emu: EmulatorHost, file_id: str, name: str, content_type: str, handle: IO[bytes], size: int, life: Any
) -> str:
    handle.flush()
    entry = FileEntry(file_id, name, content_type, "disk", size=size, handle=handle)
    emu.state.add_file(entry, life)
    return f"{emu.url}/files/{file_id}/{name}"


def _single(emu: EmulatorHost, request: Request) -> Response:
    lifespan, bad = parse_lifespan(emu, request)
    if bad is not None:
        return bad
    name, content_type = _file_name(emu, request)
    handle = _spool(request.body)
    url = _serve(emu, uuid.uuid4().hex, name, content_type, handle, len(request.body), lifespan)
    return Response.json(200, {"access_url": url, "file_size": len(request.body)})


def _create(emu: EmulatorHost, request: Request) -> Response:
    lifespan, bad = parse_lifespan(emu, request)
    if bad is not None:
        return bad
    name, content_type = _file_name(emu, request)
    upload_id = uuid.uuid4().hex
    upload = Multipart(uuid.uuid4().hex, name, content_type, lifespan)
    with emu.state.lock:
        emu.state.uploads[upload_id] = upload
    return Response.json(200, {"access_url": f"{emu.url}/files/{upload.file_id}/{name}", "uploadId": upload_id})


def _complete(emu: EmulatorHost, request: Request, upload_id: str, upload: Multipart) -> Response:
    body = request.json_or_none()
    listed = body.get("parts") if isinstance(body, dict) else None
    if not isinstance(listed, list) or not listed:
        return error(400, 'complete needs {"parts": [{"partNumber": n, "etag": "..."}]}')
    try:
        numbers = [int(part["partNumber"]) for part in listed]
        etags = [str(part["etag"]) for part in listed]
    except (KeyError, TypeError, ValueError):
        return error(400, "every part needs partNumber and etag")
    if sorted(numbers) != list(range(1, len(numbers) + 1)):
        return error(400, f"parts must be numbered 1..{len(numbers)}, got {sorted(numbers)}")
    with emu.state.lock:
        stored = dict(upload.parts)
    for number, etag in zip(numbers, etags, strict=True):
        if number not in stored or stored[number][2] != etag:
            return error(400, f"part {number} was not uploaded or its ETag does not match")
    joined = _spool(b"")
    size = 0
    for number in sorted(numbers):
        handle, part_size, _ = stored[number]
        handle.seek(0)
        shutil.copyfileobj(handle, joined, 1024 * 1024)
        size += part_size
    with emu.state.lock:
        emu.state.uploads.pop(upload_id, None)
    for handle, _, _ in stored.values():
        handle.close()
    url = _serve(emu, upload.file_id, upload.name, upload.content_type, joined, size, upload.lifespan)
    return Response.json(200, {"access_url": url})


def add_upload_fault(emu: EmulatorHost, step: str, part: int | None, times: int | None, status: int) -> None:
    """Make ``step`` (``token``, ``upload``, ``create``, ``part`` (``part`` number, or every
    part) or ``complete``) answer ``status`` the next ``times`` times (None: until reset)."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {', '.join(STEPS)}")
    wanted = f"part:{int(part)}" if step == "part" and part is not None else step
    with emu.state.lock:
        emu.state.upload_faults.append([wanted, times, int(status)])
